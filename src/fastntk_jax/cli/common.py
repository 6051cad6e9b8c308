"""What several ``fastntk`` commands share: the usage error, images, and
loading the model of a ``train`` checkpoint."""

from __future__ import annotations

__all__ = ["UsageError", "checkpoint_data", "load_images",
           "model_from_checkpoint", "model_from_config"]


class UsageError(ValueError):
  """A bad flag or flag combination: printed without a traceback."""


def load_images(args, split: str, *, image_size: int, ipc=None, first=None,
                classes=None):
  from fastntk_jax import data
  return data.load_dataset(args.data, split, ipc=ipc, first=first,
                           classes=classes, image_size=image_size)


def model_from_checkpoint(path, which: str = "w_D"):
  """(name, module, apply_fn, checkpoint, preprocess) from a ``train``
  checkpoint."""
  from fastntk_jax.io import checkpoint
  ckpt = checkpoint.load(path, expect_kind="peft")
  if which not in ckpt.trees:
    raise UsageError(f"--params: {path} has no {which!r}; it has "
                     f"{sorted(k for k in ckpt.trees if k != 'frozen')}.")
  name, module, apply_fn, prep = model_from_config(
      ckpt.config, ckpt.trees["frozen"], ckpt.trees.get("w_0"))
  return name, module, apply_fn, ckpt, prep


def model_from_config(cfg, frozen, w_0=None):
  """(name, module, apply_fn, preprocess) of a checkpoint's config and its
  frozen variables; a tangent-mode model needs ``w_0``."""
  from fastntk_jax import peft
  from fastntk_jax.models import zoo
  name = cfg["model"]
  module = zoo.build(name, num_classes=int(cfg["num_classes"]),
                     num_prompts=int(cfg.get("num_prompts", 0)))

  def apply_fn(p, x):
    return module.apply(peft.merge(p, frozen), x, train=False)

  if cfg.get("finetune", {}).get("tangent"):
    # Fine-tuned in tangent mode: the model is f(w_0) + J(w_0)(w − w_0).
    from fastntk_jax.core.tangent import tangent_model
    apply_fn = tangent_model(apply_fn, w_0)
  return name, module, apply_fn, zoo.preprocess_fn(name)


def checkpoint_data(args, cfg, image_size: int):
  """The training set a checkpoint was fine-tuned on, and its test set."""
  from fastntk_jax.data import splits
  d = cfg["data"]
  ds = load_images(args, "train", image_size=image_size, ipc=d.get("ipc"),
                   classes=d.get("classes"))
  test = load_images(args, "test", image_size=image_size,
                     ipc=args.test_ipc or d.get("test_ipc"),
                     classes=d.get("classes"))
  if cfg.get("exclude"):
    keep, _ = splits.apply_forget(splits.parse_forget(cfg["exclude"]), ds.y,
                                  ds.class_names)
    ds = ds._replace(x=ds.x[keep], y=ds.y[keep])
  return ds, test
