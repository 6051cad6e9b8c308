"""Input checks shared by the public entry points (``unlearn``, ``deletion``).

Each check raises ``TypeError``/``ValueError`` naming the argument and the
fix, before any heavy work.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "LINEARIZE_AT",
    "LOSS_NAMES",
    "check_damping",
    "check_finite_tree",
    "check_labels",
    "check_loss",
    "check_memory_budget",
    "check_points",
    "check_positive_int_or_none",
    "check_split",
    "check_tolerance",
]

#: ``linearize_at`` choices: the trained parameters or the anchor.
LINEARIZE_AT = ("w_D", "w_0")
#: ``loss`` choices.
LOSS_NAMES = ("mse", "ce")


def check_split(name: str, data):
  """``(x, y)`` with a sample axis, integer labels ``(N,)`` and finite ``x``."""
  if not isinstance(data, (tuple, list)) or len(data) != 2:
    raise TypeError(f"{name}: expected a pair (x, y) of inputs and integer "
                    f"labels, got {type(data).__name__}.")
  x, y = data
  x_shape = np.shape(x)
  y = np.asarray(y)
  if len(x_shape) < 1:
    raise ValueError(f"{name}: x must have a leading sample axis, got shape "
                     f"{x_shape}.")
  if y.ndim != 1:
    raise ValueError(f"{name}: y must be a 1-D array of integer labels, got "
                     f"shape {y.shape}. Pass class indices, not one-hot rows.")
  if not np.issubdtype(y.dtype, np.integer):
    raise TypeError(f"{name}: y must hold integer class labels, got dtype "
                    f"{y.dtype}. Convert with y.astype(int).")
  if x_shape[0] != y.shape[0]:
    raise ValueError(f"{name}: x has {x_shape[0]} samples but y has "
                     f"{y.shape[0]}; they must match.")
  xa = np.asarray(x) if not isinstance(x, jax.Array) else x
  finite = np.isfinite if isinstance(xa, np.ndarray) else jnp.isfinite
  if jnp.issubdtype(xa.dtype, jnp.inexact) and not bool(finite(xa).all()):
    raise ValueError(f"{name}: x contains NaN or infinite values; clean or "
                     "drop those samples.")
  return xa, y


def check_finite_tree(name: str, tree) -> None:
  """A non-empty pytree of finite floating-point arrays."""
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    raise ValueError(f"{name}: the pytree has no arrays.")
  for leaf in leaves:
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise TypeError(f"{name}: every leaf must be a floating-point array, got "
                      f"{jnp.result_type(leaf)}.")
    if not bool(jnp.all(jnp.isfinite(leaf))):
      raise ValueError(f"{name}: contains NaN or infinite values.")


def check_int(name: str, value, minimum: int, note: str = "") -> None:
  """``value`` an int (not a bool) ``>= minimum``; ``note`` explains it."""
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}{note}, got "
                     f"{value!r}.")


def check_positive_int_or_none(name: str, value) -> None:
  if value is not None and (isinstance(value, bool) or int(value) != value
                            or value < 1):
    raise ValueError(f"{name} must be a positive int or None, got {value!r}.")


def check_tolerance(name: str, value, *, allow_none: bool = False) -> None:
  """A relative tolerance: a float in (0, 1) (or None when allowed)."""
  if value is None and allow_none:
    return
  if isinstance(value, bool) or not isinstance(
      value, (int, float, np.floating)) or not 0 < float(value) < 1:
    raise ValueError(f"{name} must be a float in (0, 1)"
                     f"{' or None' if allow_none else ''}, got {value!r}.")


def check_memory_budget(value) -> None:
  if isinstance(value, bool) or not isinstance(
      value, (int, np.integer)) or value <= 0:
    raise ValueError(f"memory_budget must be a positive number of bytes, got "
                     f"{value!r}.")


def check_damping(damping, *, positive: bool = False) -> float:
  """λ as a Python float: finite and ≥ 0 (``positive``: > 0)."""
  if isinstance(damping, bool) or not isinstance(
      damping, (int, float, np.floating, np.integer)):
    raise TypeError(f"damping must be a float ≥ 0, got {type(damping)}.")
  damping = float(damping)
  if not math.isfinite(damping) or damping < 0 or (positive and damping == 0):
    hint = ("it must be > 0 here: the problem is only strongly convex, and "
            "the factors exist, for λ > 0" if positive else
            "use 0 for the λ → 0⁺ (pseudo-inverse) limit")
    raise ValueError(f"damping must be finite and {'>' if positive else '≥'} "
                     f"0, got {damping}; {hint}.")
  return damping


#: The dtypes of the ``P×P`` matrices and of the solves, by name.
SOLVE_DTYPES = ("float64", "float32")


def check_solve_dtype(solve_dtype: str):
  """The JAX dtype named by ``solve_dtype`` (``"float64"`` or
  ``"float32"``); anything else is a ValueError."""
  if solve_dtype not in SOLVE_DTYPES:
    raise ValueError(f"solve_dtype must be one of {SOLVE_DTYPES}, got "
                     f"{solve_dtype!r}.")
  return jnp.float64 if solve_dtype == "float64" else jnp.float32


def check_loss(loss) -> str:
  if loss not in LOSS_NAMES:
    raise ValueError(f"loss must be one of {LOSS_NAMES}, got {loss!r}.")
  return loss


def check_labels(name: str, y: np.ndarray, c: int) -> None:
  if y.size and (y.min() < 0 or y.max() >= c):
    raise ValueError(
        f"{name}: labels must lie in [0, {c}) for a model with {c} logits; "
        f"got range [{y.min()}, {y.max()}].")


def _same_layout(name: str, tree, params) -> None:
  s_p = jax.tree_util.tree_structure(params)
  s_t = jax.tree_util.tree_structure(tree)
  if s_p != s_t:
    raise ValueError(f"{name} must have the tree structure of params (w_0 and "
                     f"w_D of the same PEFT pytree); got {s_t} vs {s_p}.")
  for a, b in zip(jax.tree_util.tree_leaves(params),
                  jax.tree_util.tree_leaves(tree)):
    if np.shape(a) != np.shape(b):
      raise ValueError(f"{name}: a leaf has shape {np.shape(b)} where params "
                       f"has {np.shape(a)}.")


def check_points(params, anchor, linearize_at, legacy: dict):
  """The two points of the linearised problem.

  Returns ``(lin, anc)``: the pytree where ``J`` and ``f`` are taken and the
  ridge anchor ``w_0`` (``params`` itself when ``anchor`` is None).
  """
  if "init_params" in legacy:
    raise TypeError(
        "init_params was replaced by two arguments that say what each point "
        "is: anchor=w_0 (the centre of the ridge term, the parameters "
        "fine-tuning started from) and linearize_at='w_D' (default) or 'w_0' "
        "(where J and f are taken). The old init_params=w_0 is "
        "anchor=w_0, linearize_at='w_0'; init_params=None is anchor=None.")
  if legacy:
    raise TypeError(f"unexpected keyword arguments {sorted(legacy)}.")
  check_finite_tree("params", params)
  if linearize_at not in LINEARIZE_AT:
    raise ValueError(f"linearize_at must be one of {LINEARIZE_AT}, got "
                     f"{linearize_at!r}: 'w_D' takes J and f at params, "
                     "'w_0' at anchor.")
  if anchor is not None:
    check_finite_tree("anchor", anchor)
    _same_layout("anchor", anchor, params)
  elif linearize_at == "w_0":
    raise ValueError("linearize_at='w_0' needs anchor=w_0 (the PEFT "
                     "parameters before fine-tuning).")
  anc = params if anchor is None else anchor
  lin = params if linearize_at == "w_D" else anc
  return lin, anc
