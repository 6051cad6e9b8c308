"""The ``fastntk`` argument parser: one function per sub-command.

Defaults that the library owns are read from it (the fine-tuning recipe from
:class:`~fastntk_jax.training.train.FinetuneConfig`, λ from
:data:`fastntk_jax.DEFAULT_DAMPING`), never restated here.
"""

from __future__ import annotations

import argparse

from fastntk_jax.core.solvers import DEFAULT_MEMORY_BUDGET
from fastntk_jax.core.unlearn import DEFAULT_DAMPING
from fastntk_jax.training.train import FinetuneConfig
from fastntk_jax.training.train import PretrainConfig

__all__ = ["build_parser"]

_FT = FinetuneConfig()
_PT = PretrainConfig()

_DATA_HELP = ("image source: 'embedded' (shipped subset, 100 train/test images "
              "a class), 'cifar10-jpeg' (../shared/data zip, or "
              "cifar10-jpeg:PATH), 'cifar10-lossless', 'folder:ROOT' "
              "(ROOT/<split>/<class>/*.jpg|png) or 'tfds:NAME'")


def build_parser() -> argparse.ArgumentParser:
  """The parser of ``fastntk``; ``args.command`` names the sub-command."""
  p = argparse.ArgumentParser(
      prog="fastntk",
      description="Fast-NTK: PEFT fine-tuning and one-shot NTK unlearning.")
  sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
  _add_params(sub)
  _add_evaluate(sub)
  _add_pretrain(sub)
  _add_train(sub)
  _add_unlearn(sub)
  _add_experiment(sub)
  _add_tune(sub)
  _add_deletion(sub)
  return p


def _common(q, data_default="embedded") -> None:
  q.add_argument("--data", default=data_default, help=_DATA_HELP +
                 f" (default: {data_default})")
  q.add_argument("--json", metavar="PATH", help="also write the results "
                 "(with device, versions and configuration) to PATH")
  q.add_argument("--quiet", action="store_true", help="no progress lines")
  q.add_argument("--seed", type=int, default=0, help="random seed "
                 "(default: 0)")


def _add_params(sub) -> None:
  q = sub.add_parser("params", help="parameter counts: total, PEFT, ratio")
  q.add_argument("--models", nargs="+", metavar="NAME",
                 help="models to count (default: all)")
  q.add_argument("--num-classes", type=int, default=10,
                 help="head width (default: 10)")
  q.add_argument("--num-prompts", type=int, default=5,
                 help="ViT prompt length L_p (default: 5)")
  q.add_argument("--json", metavar="PATH", help="also write JSON to PATH")
  q.set_defaults(command="params")


def _add_evaluate(sub) -> None:
  q = sub.add_parser("evaluate", help="accuracy of a backbone or a fine-tuned "
                     "checkpoint on a split")
  q.add_argument("--model", help="registry name (see `fastntk params`)")
  q.add_argument("--weights", metavar="PATH", help="backbone weights: a "
                 "`fastntk pretrain` checkpoint, a ResNet PyTorch .npz, or "
                 "for ViTs a vision_transformer/big_vision .npz or a timm "
                 ".safetensors (default: the shipped/shared CIFAR-10 ResNet "
                 "weights)")
  q.add_argument("--checkpoint", metavar="PATH", help="a `fastntk train` or "
                 "`fastntk unlearn` checkpoint instead of --weights")
  q.add_argument("--params", default="w_D", choices=["w_D", "w_0",
                                                     "w_trained"],
                 help="which PEFT parameters of --checkpoint (default: w_D)")
  q.add_argument("--split", default="test", choices=["train", "test"],
                 help="which split to evaluate (default: test)")
  q.add_argument("--first", type=int, help="the first N images of the split "
                 "in the original CIFAR-10 order (e.g. 1000)")
  q.add_argument("--ipc", type=int, help="the first K images of each class")
  _common(q, data_default="embedded")
  q.set_defaults(command="evaluate")


def _add_pretrain(sub) -> None:
  q = sub.add_parser("pretrain", help="train a backbone from scratch (all "
                     "parameters; meant for a GPU; resumable)")
  q.add_argument("--model", required=True, help="registry name (see "
                 "`fastntk params`)")
  q.add_argument("--out", required=True, metavar="PATH",
                 help="checkpoint, rewritten atomically after every epoch")
  q.add_argument("--resume", action="store_true",
                 help="continue the run saved in --out")
  q.add_argument("--holdout-ipc", type=int, default=500, help="images per "
                 "class (the first, by rank) kept out of pre-training for "
                 "fine-tuning/unlearning experiments (default: 500)")
  q.add_argument("--max-ipc", type=int, help="at most this many pre-training "
                 "images per class (small CPU runs)")
  q.add_argument("--test-ipc", type=int, help="test images per class for the "
                 "evaluation (default: all)")
  q.add_argument("--epochs", type=int, default=_PT.epochs,
                 help=f"epochs of the cosine schedule (default: {_PT.epochs})")
  q.add_argument("--batch-size", type=int, default=_PT.batch_size,
                 help=f"images per step (default: {_PT.batch_size})")
  q.add_argument("--lr", type=float, help="peak learning rate (default: 0.1 "
                 "SGD, 1e-3 AdamW)")
  q.add_argument("--optimizer", choices=["sgd", "adamw"], help="default: sgd "
                 "for CNNs, adamw for ViTs")
  q.add_argument("--weight-decay", type=float,
                 help="default: 5e-4 SGD, 0.05 AdamW")
  q.add_argument("--warmup-epochs", type=int, default=_PT.warmup_epochs,
                 help=f"linear warm-up epochs (default: {_PT.warmup_epochs})")
  q.add_argument("--crop-padding", type=int, default=_PT.crop_padding,
                 help="random-crop padding in pixels, 0 disables (default: "
                 f"{_PT.crop_padding})")
  q.add_argument("--no-flip", action="store_true",
                 help="no random horizontal flips")
  q.add_argument("--label-smoothing", type=float, default=_PT.label_smoothing,
                 help="cross-entropy label smoothing (default: 0)")
  q.add_argument("--eval-every", type=int, default=10, help="test accuracy "
                 "every N epochs (0: only at the end)")
  _common(q, data_default="cifar10-jpeg")
  q.set_defaults(command="pretrain")


def _add_train(sub) -> None:
  q = sub.add_parser("train", help="PEFT fine-tuning (BatchNorm or prompts + "
                     "a new head); --exclude gives Retrain")
  q.add_argument("--model", required=True, help="registry name (see "
                 "`fastntk params`)")
  q.add_argument("--weights", metavar="PATH", help="backbone (see evaluate)")
  q.add_argument("--out", metavar="PATH", help="checkpoint with w_0, w_D, "
                 "the frozen variables and the config")
  q.add_argument("--ipc", type=int, help="first K training images per class")
  q.add_argument("--test-ipc", type=int, help="first K test images per class")
  q.add_argument("--classes", help="comma-separated class subset (names or "
                 "indices), relabelled 0..k-1")
  q.add_argument("--exclude", metavar="SPEC", help="leave this forget set out "
                 "of training (Retrain): class:0, class:cat,dog, random:0.1")
  q.add_argument("--peft", default="peft", choices=["peft", "all"],
                 help="'peft': BatchNorm/prompts + head (default); 'all': "
                 "every parameter")
  q.add_argument("--num-prompts", type=int, default=5,
                 help="ViT prompt length L_p (default: 5)")
  q.add_argument("--loss", default=_FT.loss, choices=["mse", "ce"],
                 help="mse (what Eq. (1) linearises) or ce (default: "
                 f"{_FT.loss})")
  q.add_argument("--epochs", type=int, default=_FT.epochs,
                 help=f"passes over the data (default: {_FT.epochs})")
  q.add_argument("--batch-size", type=int, default=_FT.batch_size,
                 help=f"samples per step (default: {_FT.batch_size})")
  q.add_argument("--lr", type=float, default=_FT.learning_rate,
                 help=f"Adam step size (default: {_FT.learning_rate})")
  q.add_argument("--proximal", type=float, default=_FT.proximal, metavar="L",
                 help="add (L/N)/2‖w − w_0‖² to the mean loss: the ridge term "
                 "Fast-NTK solves with --damping L (default 0: off)")
  q.add_argument("--tangent", action="store_true",
                 help="fine-tune the tangent model f(w_0) + J(w_0)(w − w_0) "
                 "(one JVP per forward pass), which Fast-NTK unlearns "
                 "exactly; evaluate/unlearn then use that model")
  q.add_argument("--weight-decay", type=float, default=_FT.weight_decay,
                 help="decoupled weight decay (AdamW); 0 = Adam (default)")
  q.add_argument("--schedule", default=_FT.schedule,
                 choices=["constant", "cosine"],
                 help="learning-rate schedule (default: constant)")
  q.add_argument("--warmup-epochs", type=int, default=_FT.warmup_epochs,
                 help="linear warm-up epochs of the cosine schedule")
  q.add_argument("--crop-padding", type=int, default=_FT.crop_padding,
                 help="random crops with this padding (0: flips only; "
                 f"default: {_FT.crop_padding})")
  q.add_argument("--no-flip", action="store_true",
                 help="no random horizontal flips")
  q.add_argument("--head-scale", type=float, default=0.1,
                 help="scale of the new head's initial kernel (default: 0.1;"
                 " near-zero logits keep MSE fine-tuning stable)")
  q.add_argument("--bn-stats", default="pretrained",
                 choices=["pretrained", "data"],
                 help="'pretrained' (default): BatchNorm normalises with the "
                 "backbone's statistics, which never see D; 'data': "
                 "re-estimate them on the training set first (they then carry "
                 "information about D_f)")
  _common(q)
  q.set_defaults(command="train")


def _add_unlearn(sub) -> None:
  q = sub.add_parser("unlearn", help="forget a set with the one-shot "
                     "Fast-NTK update")
  q.add_argument("--checkpoint", required=True, metavar="PATH",
                 help="a `fastntk train` checkpoint")
  q.add_argument("--forget", required=True, metavar="SPEC",
                 help="class:0 | class:0,3 | class:cat | random:0.1[:seed=S]")
  q.add_argument("--out", metavar="PATH", help="checkpoint of the unlearned "
                 "model")
  q.add_argument("--damping", type=float, default=DEFAULT_DAMPING,
                 help=f"λ, weighting ½‖w − w_0‖² against the sum of "
                 f"per-sample losses (default {DEFAULT_DAMPING}; "
                 "docs/defaults.md)")
  q.add_argument("--solver", default="auto",
                 choices=["auto", "dual", "primal", "cg"],
                 help="dual: kernels over samples (N·C)²; primal: P×P "
                 "matrices over parameters; cg: matrix-free; auto: the "
                 "cheaper dense one that fits, else cg (default)")
  q.add_argument("--loss", choices=["mse", "ce"],
                 help="the linearised problem's loss (default: the "
                 "checkpoint's fine-tuning loss)")
  q.add_argument("--linearize-at", default="w_D", choices=["w_D", "w_0"],
                 help="where J and f are taken: the trained w_D (default) or "
                 "w_0")
  q.add_argument("--anchor", default="w_0", choices=["w_0", "w_D"],
                 help="the ridge term's centre: w_0, the checkpoint's "
                 "parameters before fine-tuning (default), or w_D")
  q.add_argument("--bn-stats", default="auto",
                 choices=["auto", "keep", "retain"],
                 help="'keep' the statistics, or re-estimate them on D_r "
                 "('retain'); 'auto' (default) re-estimates only when "
                 "training estimated them on D")
  q.add_argument("--test-ipc", type=int, help="first K test images per "
                 "class (default: the checkpoint's)")
  q.add_argument("--memory-budget", type=float,
                 default=DEFAULT_MEMORY_BUDGET / 2**30,
                 help="GiB for dense matrices (default: "
                 f"{DEFAULT_MEMORY_BUDGET / 2**30:g})")
  q.add_argument("--data", help="override the checkpoint's data source")
  q.add_argument("--json", metavar="PATH", help="also write the results "
                 "(with device, versions and configuration) to PATH")
  q.add_argument("--quiet", action="store_true", help="no progress lines")
  q.set_defaults(command="unlearn")


def _add_experiment(sub) -> None:
  q = sub.add_parser("experiment", help="run a bench configuration: every "
                     "method, seed and metric; resumable")
  q.add_argument("config", metavar="CONFIG", help="a .toml or .json "
                 "configuration, e.g. configs/demo.toml")
  q.add_argument("--out", metavar="DIR", help="results directory (default: "
                 "results/<config name>); rerun with the same DIR to resume")
  q.add_argument("--seeds", metavar="S", type=int, nargs="+",
                 help="override the config's seeds")
  q.add_argument("--methods", metavar="NAME", nargs="+",
                 help="override the config's methods")
  q.add_argument("--quiet", action="store_true", help="no progress output")
  q.set_defaults(command="experiment")


def _add_tune(sub) -> None:
  q = sub.add_parser("tune", help="choose each method's hyperparameters on a "
                     "validation split disjoint from every evaluation image "
                     "(docs/tuning.md); resumable")
  q.add_argument("config", metavar="CONFIG", help="the experiment "
                 "configuration to tune for, e.g. configs/demo.toml")
  q.add_argument("--out", metavar="DIR", help="tuning directory (default: "
                 "results/tune/<config name>); rerun with the same DIR to "
                 "resume")
  q.add_argument("--methods", metavar="NAME", nargs="+",
                 help="tune only these methods (default: every tunable one)")
  q.add_argument("--write", metavar="PATH", help="also copy chosen.toml and "
                 "tuning.json here (PATH.toml and PATH.json), the file an "
                 "experiment config names with tuned = \"...\"")
  q.add_argument("--quiet", action="store_true", help="no progress output")
  q.set_defaults(command="tune")


def _refresh_options(a) -> None:
  a.add_argument("--no-refresh", action="store_true",
                 help="cross-entropy stores: do not form the preconditioner "
                 "again after this request even when due (run `fastntk "
                 "deletion refresh` at a quiet time instead)")
  a.add_argument("--refresh-slack", type=float, metavar="SECONDS",
                 help="cross-entropy stores: also refresh the preconditioner "
                 "after a request that a stale one made more than SECONDS "
                 "slower than a fresh one would have (a latency rule beside "
                 "the default cost rule; docs/deletion_store.md)")


def _other_version(a) -> None:
  a.add_argument("--allow-other-version", action="store_true",
                 help="use a store written by another fastntk_jax version")


def _init_options(a) -> None:
  """``fastntk deletion init``'s options."""
  a.add_argument("--checkpoint", required=True, metavar="PATH",
                 help="a `fastntk train` checkpoint (w_0, w_D, frozen)")
  a.add_argument("--samples", metavar="NPZ", help="the training set as an "
                 ".npz with x (uint8 images), y and ids (default: the "
                 "checkpoint's training set; ids are positions in it)")
  a.add_argument("--data", help="override the checkpoint's data source")
  a.add_argument("--damping", type=float, default=DEFAULT_DAMPING,
                 help=f"λ > 0 (default {DEFAULT_DAMPING})")
  a.add_argument("--loss", choices=["mse", "ce"], help="default: the "
                 "checkpoint's fine-tuning loss")
  a.add_argument("--linearize-at", default="w_D", choices=["w_D", "w_0"],
                 help="where J and f are taken (default w_D)")
  a.add_argument("--anchor", default="w_0", choices=["w_0", "w_D"],
                 help="the ridge term's centre (default w_0, the "
                 "checkpoint's parameters before fine-tuning)")
  a.add_argument("--memory-budget", type=float,
                 default=DEFAULT_MEMORY_BUDGET / 2**30,
                 help="GiB the prepared state may take; refused before any "
                 f"work when over (default {DEFAULT_MEMORY_BUDGET / 2**30:g})")
  a.add_argument("--keep-rows", action="store_true",
                 help="MSE stores: keep the training set's Jacobian rows "
                 "(N·C·P numbers on disk and in memory, as cross-entropy "
                 "stores do) so that a request reads its rows instead of "
                 "computing them")


def _add_deletion(sub) -> None:
  q = sub.add_parser("deletion", help="a deletion store: prepare once, answer "
                     "requests for months (init, forget, status, log, verify, "
                     "export, compact, refresh)")
  q.set_defaults(command="deletion")
  ds = q.add_subparsers(dest="deletion_command", metavar="ACTION",
                        required=True, help="what to do with the store")

  def action(name, text):
    a = ds.add_parser(name, help=text)
    a.add_argument("store", metavar="STORE", help="the store's folder")
    a.add_argument("--json", metavar="PATH", help="also write the result "
                   "to PATH")
    return a

  def host_devices(a):
    a.add_argument("--host-devices", type=int, default=None, metavar="K",
                   help="split the Jacobian work over K CPU devices, e.g. one "
                   "per core (default: as JAX starts, one CPU device)")
    return a

  _init_options(host_devices(action(
      "init", "prepare a store from a `fastntk train` checkpoint and its "
      "training set")))
  a = host_devices(action("forget", "apply one deletion request (all or "
                          "nothing; a request applied before changes "
                          "nothing)"))
  a.add_argument("--ids", required=True, metavar="FILE",
                 help="the sample ids: a file ('-' for standard input) of "
                 "integers separated by spaces, commas or newlines, or a "
                 "JSON list")
  a.add_argument("--request-id", metavar="ID", help="the request's name in "
                 "the log (default: a digest of the sorted ids)")
  a.add_argument("--allow-empty-class", action="store_true",
                 help="allow removing the last samples of a class")
  a.add_argument("--compact", action="store_true",
                 help="then drop the forgotten samples' Jacobian rows "
                 "(stores with rows: cross-entropy, or MSE with --keep-rows; "
                 "rewrites the rows; by default this happens once they are "
                 "a quarter of the rows)")
  a.add_argument("--no-compact", action="store_true",
                 help="stores with rows: do not drop the forgotten "
                 "samples' rows after this request even when they are a "
                 "quarter of the rows")
  a.add_argument("--release-memory", action="store_true",
                 help="leave glibc's default of handing freed memory back "
                 "to the system (by default this process keeps it: faster "
                 "on VMs that take freed memory back; docs/deletion_store.md)")
  a.add_argument("--newton-tol", type=float, metavar="TOL",
                 help="cross-entropy stores: the solve's relative gradient "
                 "tolerance (default 1e-9, the float64 floor; 1e-7 takes "
                 "about a third fewer steps and stays within ~3e-6 of a "
                 "from-scratch answer, docs/deletion_store.md)")
  _refresh_options(a)
  _other_version(a)
  a = action("compact", "drop the Jacobian rows of forgotten samples from "
             "a store that keeps rows (cross-entropy, or MSE with "
             "--keep-rows)")
  _other_version(a)
  a = action("refresh", "form a cross-entropy store's preconditioner again "
             "at the current solution (later requests take fewer steps; "
             "the model does not change)")
  _other_version(a)
  action("status", "counts, sizes, the last request and verification")
  action("log", "every applied request")
  a = host_devices(action("verify", "recompute from scratch on the kept "
                          "samples and compare (recorded in the store)"))
  _other_version(a)
  a = action("export", "the current model as a checkpoint the other "
             "commands read")
  a.add_argument("--out", required=True, metavar="PATH",
                 help="the checkpoint to write")
