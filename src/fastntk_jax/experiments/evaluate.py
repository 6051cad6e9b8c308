"""The metrics of one unlearned model, and the linear-probe analysis.

Accuracy on D_r, D_f and the test set (per retained and forgotten classes for
class forgetting), MIA-efficacy and the loss-threshold AUC
(:mod:`fastntk_jax.evaluation.mia`), KL to Retrain (:mod:`fastntk_jax.evaluation.metrics`), relearn
time (:mod:`fastntk_jax.evaluation.relearn`), and Table III's probe
(:mod:`fastntk_jax.evaluation.probe`) on head-input features.
"""

from __future__ import annotations

import numpy as np

from fastntk_jax.core import kernels
from fastntk_jax.evaluation import metrics
from fastntk_jax.evaluation import mia
from fastntk_jax.evaluation import mia_papers
from fastntk_jax import peft
from fastntk_jax.evaluation import probe
from fastntk_jax.evaluation import relearn
from fastntk_jax.models import zoo
from fastntk_jax.experiments.features import head_input_fn

__all__ = ["evaluate", "probe_report"]


def relearn_threshold(apply_fn, w_d, forget, recipe, mcfg) -> float:
  """The loss on D_f that counts as relearnt.

  ``metrics.relearn_threshold = "full"`` (the default) calibrates it to the
  model before unlearning: ``w_D``'s own recipe loss on D_f, so that a model
  which forgot nothing (Full) needs 0 epochs by construction and every count
  reads "epochs to get back to where ``w_D`` was". The factor ``1 + 1e-4``
  absorbs the rounding between this evaluation and the relearn loop's. A
  number is an absolute threshold (the Fast-NTK paper's 0.05).
  """
  thr = mcfg["relearn_threshold"]
  if thr != "full":
    return float(thr)
  value = float(relearn.forget_loss(apply_fn, w_d, forget[0], forget[1],
                                    recipe.loss))
  return value * (1.0 + 1e-4)


def evaluate(apply_fn, params, sets, *, forget_kind, forget_classes, recipe,
              mcfg, seed, retrain_logits, relearn_at=None) -> tuple[dict, dict]:
  """The metrics of one method on one seed.

  Args:
    apply_fn, params: the model and the method's parameters.
    sets: ``((x_r, y_r), (x_f, y_f), (x_t, y_t))``, inputs preprocessed.
    forget_kind: ``"class"`` or ``"random"``.
    forget_classes: the forgotten classes (class forgetting).
    recipe: the fine-tuning recipe (relearning uses it).
    mcfg: the ``[metrics]`` configuration.
    seed: the MIA's subsampling seed.
    retrain_logits: Retrain's ``{"forget", "test"}`` logits (None: no KL).
    relearn_at: the relearn threshold (:func:`relearn_threshold`); None:
      the configured number.

  Returns:
    ``(metrics, extra)``: the metric values (percent for accuracies and MIA)
    and ``{"relearn_curve", "relearn_reached", "_logits"}``.
  """
  (x_r, y_r), (x_f, y_f), (x_t, y_t) = sets
  logits = {k: np.asarray(kernels.predict(apply_fn, params, x))
            for k, x in (("retain", x_r), ("forget", x_f), ("test", x_t))}
  acc = lambda k, y, mask=None: float(100 * np.mean(
      (np.argmax(logits[k], -1) == y)[mask if mask is not None else slice(None)]
  )) if (mask is None or mask.any()) else float("nan")
  out = {"acc_retain": acc("retain", y_r), "acc_forget": acc("forget", y_f),
         "acc_test": acc("test", y_t)}
  in_forget = np.isin(y_t, forget_classes)
  if forget_kind == "class":
    out["acc_test_retained"] = acc("test", y_t, ~in_forget)
    out["acc_test_forgotten"] = acc("test", y_t, in_forget)
  if mcfg["mia"]:
    # Members: D_r. Non-members: held-out images of the same classes as D_r,
    # so the attack learns membership rather than class identity.
    nonmem = ~in_forget if forget_kind == "class" else np.ones(len(y_t), bool)
    res = mia.mia_efficacy(logits["retain"], y_r, logits["test"][nonmem],
                           y_t[nonmem], logits["forget"], y_f, seed=seed)
    out["mia"] = 100 * float(res.efficacy)
    out["mia_attack_accuracy"] = 100 * float(res.attack_balanced_accuracy)
    out["mia_attack_auc"] = float(res.attack_auc)
    shadow = (logits["retain"], y_r, logits["test"][nonmem], y_t[nonmem],
              logits["forget"], y_f)
    svc = mia_papers.svc_mia(*shadow, feature="confidence", seed=seed)
    out["mia_svc"] = 100 * float(svc.efficacy)
    out["mia_svc_auc"] = float(svc.attack_auc)
    ent = mia_papers.entropy_mia(*shadow)
    out["mia_entropy"] = 100 * float(ent.efficacy)
    out["mia_entropy_auc"] = float(ent.attack_auc)
    # Loss-threshold AUC of D_f against unseen images of D_f's classes:
    # 0.5 = D_f looks unseen.
    same = in_forget if forget_kind == "class" else np.ones(len(y_t), bool)
    lf = mia.per_sample_loss(logits["forget"], y_f, "ce")
    lt = mia.per_sample_loss(logits["test"][same], y_t[same], "ce")
    out["mia_auc"] = float(mia.loss_auc(lf, lt))
  if retrain_logits is not None:
    out["kl_to_retrain"] = float(np.mean(metrics.softmax_kl(
        retrain_logits["forget"], logits["forget"])))
    out["kl_to_retrain_test"] = float(np.mean(metrics.softmax_kl(
        retrain_logits["test"], logits["test"])))
    out["js_to_retrain"] = float(np.mean(metrics.softmax_js(
        retrain_logits["forget"], logits["forget"])))
  extra = {}
  if mcfg["relearn"]:
    thr = (float(mcfg["relearn_threshold"]) if relearn_at is None
           else float(relearn_at))
    rl = relearn.relearn_time(apply_fn, params, x_f, y_f, config=recipe,
                              threshold=thr,
                              max_epochs=mcfg["relearn_max_epochs"])
    out["relearn_epochs"] = int(rl.epochs)
    out["relearn_threshold"] = thr
    extra["relearn_curve"] = np.asarray(rl.losses).tolist()
    extra["relearn_reached"] = bool(rl.reached)
  return out, {**extra, "_logits": logits}


def probe_report(model, w_r, xn, y_tr, idx, num_classes, *, image_size: int,
                 epochs: int, seed: int) -> dict:
  """Table III: a linear head on frozen features, trained on D.

  Args:
    model: the prepared model (``zoo.prepare``): module, frozen, ``w_0``.
    w_r: the Fast-NTK-unlearned PEFT parameters.
    xn, y_tr: D (preprocessed) and its labels.
    idx: ``(retain_idx, forget_idx)`` into D.
    num_classes: classes of the head.
    image_size: to initialise the random backbone.
    epochs: of the probe's training.
    seed: the probe's and the random backbone's seed.

  Returns:
    ``{backbone: {"acc_retain", "acc_forget", "seconds"}}`` for the
    unlearned, pretrained and randomly initialised backbones (percent).
  """
  feats = head_input_fn(model.module)
  random_vars = zoo.init_variables(model.module, image_size, seed + 1000)
  backbones = {"fast_ntk": peft.merge(w_r, model.frozen),
               "pretrained": peft.merge(model.init_params, model.frozen),
               "random_init": random_vars}
  r_idx, f_idx = idx
  out = {}
  for name, variables in backbones.items():
    f = np.asarray(kernels.predict(feats, variables, xn))
    res = probe.linear_probe(f, y_tr, f[r_idx], y_tr[r_idx], f[f_idx],
                             y_tr[f_idx], num_classes=num_classes,
                             epochs=epochs, seed=seed)
    out[name] = {"acc_retain": 100 * float(res.acc_retain),
                 "acc_forget": 100 * float(res.acc_forget),
                 "seconds": float(res.seconds)}
  return out
