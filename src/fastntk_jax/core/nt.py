"""neural-tangents on current JAX: the one place the library imports it from.

neural-tangents 0.6.5 (its last release) no longer imports on current JAX:

* ``from jax.core import Jaxpr, JaxprEqn, Literal, Var, Primitive`` — these
  moved to ``jax.extend.core`` (JAX >= 0.6);
* ``from jax.util import safe_map, safe_zip`` — ``jax.util`` is gone (>= 0.8);
* ``jax.interpreters.ad.zeros_like_p`` — gone (>= 0.10);
* its package ``__init__`` imports ``neural_tangents.experimental``, which
  imports TensorFlow and tf2jax.

Rather than patching JAX's own modules (which would leak into the user's
process), this module loads neural-tangents' ``_src`` sources under a private
package name, ``fastntk_jax._nt_src``, rewriting only the import lines listed
above so that they resolve through small forwarding namespaces defined here.
The public ``neural_tangents`` package is never executed, so TensorFlow is not
imported, and a user's own ``import neural_tangents`` is left untouched.

Only implementations 1 (Jacobian contraction) and 2 (NTK-vector products) are
offered: implementation 3 (structured derivatives) relies on JAX internals
that changed after 0.4.26 and does not give correct results on current JAX.

neural-tangents is loaded on first use, so that code paths which need no
kernel (the parameter-space solver) work without it.

Public names: :func:`empirical_ntk_fn`, :func:`empirical_ntk_vp_fn`,
:func:`nt_version`.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import re
import sys
import types
import warnings
from pathlib import Path

import jax

__all__ = [
    "NeuralTangentsUnavailable",
    "empirical_ntk_fn",
    "empirical_ntk_vp_fn",
    "nt_version",
]

_PRIVATE = __name__ + "_src"  # "fastntk_jax._nt_src"
_SUPPORTED_NT = ("0.6.5",)


class NeuralTangentsUnavailable(ImportError):
  """neural-tangents is missing or cannot be loaded on this JAX."""


# ----------------------------------------------------------------------------
# Forwarding namespaces for the JAX modules neural-tangents imports from.


def _forwarding_module(name: str, *sources: str, extra: dict | None = None,
                       fallbacks: dict | None = None):
  """A module whose attributes are looked up in ``sources`` in order.

  ``extra`` wins over the sources; ``fallbacks`` serve names none of them has
  (names neural-tangents only uses in annotations).
  """
  fallbacks = dict(fallbacks or {})
  mod = types.ModuleType(name)
  mods = []
  for src in sources:
    try:
      mods.append(importlib.import_module(src))
    except ImportError:
      pass
  extra = dict(extra or {})

  def __getattr__(attr):  # PEP 562
    if attr in extra:
      return extra[attr]
    with warnings.catch_warnings():  # deprecated aliases must not fail a load
      warnings.simplefilter("ignore")
      for m in mods:
        if hasattr(m, attr):
          return getattr(m, attr)
    if attr in fallbacks:
      return fallbacks[attr]
    raise AttributeError(
        f"neural-tangents asked for {name}.{attr}, which none of {sources} "
        f"has on JAX {jax.__version__}.")

  mod.__getattr__ = __getattr__
  return mod


def _safe_map(f, *args):
  n = len(args[0])
  for a in args[1:]:
    if len(a) != n:
      raise ValueError(f"safe_map: length mismatch {[len(a) for a in args]}")
  return list(map(f, *args))


def _safe_zip(*args):
  n = len(args[0])
  for a in args[1:]:
    if len(a) != n:
      raise ValueError(f"safe_zip: length mismatch {[len(a) for a in args]}")
  return list(zip(*args))


def _build_shims() -> dict[str, types.ModuleType]:
  # A placeholder primitive stands in for zeros_like_p where JAX removed it:
  # neural-tangents only uses it as a key of implementation-3 rule tables, and
  # no jaxpr on such a JAX can contain it.
  from jax.extend.core import Primitive  # pylint: disable=g-import-not-at-top
  ad_extra = {}
  try:
    from jax.interpreters import ad as _ad  # pylint: disable=g-import-not-at-top
    if not hasattr(_ad, "zeros_like_p"):
      ad_extra["zeros_like_p"] = Primitive("fastntk_removed_zeros_like")
  except ImportError:
    pass
  core = _forwarding_module(
      _PRIVATE + "._jax_core", "jax.extend.core", "jax.core",
      "jax._src.core", fallbacks={"Value": object})
  ad = _forwarding_module(
      _PRIVATE + "._jax_ad", "jax.interpreters.ad",
      "jax._src.interpreters.ad", extra=ad_extra)
  util = _forwarding_module(
      _PRIVATE + "._jax_util", extra={"safe_map": _safe_map,
                                      "safe_zip": _safe_zip})
  return {"core": core, "ad": ad, "util": util}


# Import lines rewritten in neural-tangents' sources; each maps onto a shim.
_REWRITES = (
    (re.compile(r"^from jax import core$", re.M),
     f"from {_PRIVATE} import _jax_core as core"),
    (re.compile(r"^from jax\.core import ", re.M),
     f"from {_PRIVATE}._jax_core import "),
    (re.compile(r"^from jax\.util import ", re.M),
     f"from {_PRIVATE}._jax_util import "),
    (re.compile(r"^from jax\.interpreters import ad$", re.M),
     f"from {_PRIVATE} import _jax_ad as ad"),
    (re.compile(r"^from jax\.interpreters\.ad import ", re.M),
     f"from {_PRIVATE}._jax_ad import "),
    (re.compile(r"\bjax\.interpreters\.ad\.zeros_like_p\b"),
     f"sys.modules['{_PRIVATE}._jax_ad'].zeros_like_p"),
)


class _RewritingLoader(importlib.abc.SourceLoader):

  def __init__(self, fullname: str, path: Path):
    self._fullname = fullname
    self._path = path

  def get_filename(self, fullname):
    return str(self._path)

  def get_data(self, path):
    source = Path(path).read_text(encoding="utf-8")
    for pattern, repl in _REWRITES:
      source = pattern.sub(repl, source)
    if "sys.modules[" in source and "\nimport sys\n" not in source:
      future = list(re.finditer(r"^from __future__ import .*$", source, re.M))
      at = future[-1].end() + 1 if future else 0
      source = source[:at] + "import sys\n" + source[at:]
    return source.encode("utf-8")

  def path_stats(self, path):  # no bytecode caching of rewritten sources
    raise OSError


class _Finder(importlib.abc.MetaPathFinder):
  """Finds ``fastntk_jax._nt_src.*`` in the installed neural_tangents."""

  def __init__(self, root: Path):
    self._root = root

  def find_spec(self, fullname, path=None, target=None):
    if not fullname.startswith(_PRIVATE + "."):
      return None
    rel = fullname[len(_PRIVATE) + 1:].split(".")
    base = self._root.joinpath(*rel)
    if (base / "__init__.py").is_file():
      return importlib.util.spec_from_file_location(
          fullname, base / "__init__.py",
          loader=_RewritingLoader(fullname, base / "__init__.py"),
          submodule_search_locations=[str(base)])
    if base.with_suffix(".py").is_file():
      return importlib.util.spec_from_file_location(
          fullname, base.with_suffix(".py"),
          loader=_RewritingLoader(fullname, base.with_suffix(".py")))
    return None


def _load():
  spec = importlib.util.find_spec("neural_tangents")
  if spec is None or not spec.submodule_search_locations:
    raise NeuralTangentsUnavailable(
        "neural-tangents is not installed. Install it without the TensorFlow "
        "it declares but never needs here: `pip install --no-deps "
        "neural-tangents==0.6.5` (`make` does; `pip install fastntk_jax` "
        "alone does not).")
  root = Path(list(spec.submodule_search_locations)[0])
  version = None
  init = root / "__init__.py"
  m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", init.read_text())
  if m:
    version = m.group(1)
  if version not in _SUPPORTED_NT:
    warnings.warn(
        f"neural-tangents {version} found; fastntk_jax is tested with "
        f"{', '.join(_SUPPORTED_NT)} and rewrites its imports for that version.",
        RuntimeWarning, stacklevel=3)
  if _PRIVATE not in sys.modules:
    pkg = types.ModuleType(_PRIVATE)
    pkg.__path__ = []  # a namespace: submodules come from _Finder
    pkg.__package__ = _PRIVATE
    for short, mod in _build_shims().items():
      setattr(pkg, "_jax_" + short, mod)
      sys.modules[f"{_PRIVATE}._jax_{short}"] = mod
    sys.modules[_PRIVATE] = pkg
    sys.meta_path.insert(0, _Finder(root))
  try:
    empirical = importlib.import_module(_PRIVATE + "._src.empirical")
  except Exception as e:  # pylint: disable=broad-except
    raise NeuralTangentsUnavailable(
        f"neural-tangents {version} (at {root}) could not be loaded on JAX "
        f"{jax.__version__}: {type(e).__name__}: {e}. fastntk_jax is tested "
        f"with neural-tangents {', '.join(_SUPPORTED_NT)}; install that "
        "version.") from e
  return empirical, version


_STATE: dict = {}


def _get():
  """neural-tangents' ``empirical`` module, loaded on first use."""
  if "empirical" not in _STATE:
    _STATE["empirical"], _STATE["version"] = _load()
  return _STATE["empirical"]


def nt_version() -> str | None:
  """The loaded neural-tangents version (loads it)."""
  _get()
  return _STATE["version"]


# Implementations offered and tested (3, structured derivatives, is excluded).
_SUPPORTED = {1: "JACOBIAN_CONTRACTION", 2: "NTK_VECTOR_PRODUCTS"}


def _check_implementation(implementation):
  if isinstance(implementation, bool) or int(implementation) != implementation:
    raise ValueError(f"implementation must be 1 or 2, got {implementation!r}.")
  impl = _get().NtkImplementation(int(implementation))
  if int(impl) not in _SUPPORTED:
    raise ValueError(
        f"implementation={int(implementation)} ({impl.name}) is not supported: "
        "neural-tangents' structured derivatives fail on JAX >= 0.4.26. Use "
        "implementation=1 (Jacobian contraction, the default) or 2 "
        "(NTK-vector products).")
  return impl


def empirical_ntk_fn(f, trace_axes=(-1,), diagonal_axes=(), vmap_axes=None,
                     implementation=1):
  """``neural_tangents.empirical_ntk_fn``, restricted to implementations 1/2.

  See neural-tangents' documentation; arguments are passed through.
  """
  return _get().empirical_ntk_fn(
      f, trace_axes=trace_axes, diagonal_axes=diagonal_axes,
      vmap_axes=vmap_axes, implementation=_check_implementation(implementation))


def empirical_ntk_vp_fn(f, x1, x2, params, **kwargs):
  """``neural_tangents.empirical_ntk_vp_fn``: ``ntk_vp(cotangents)`` for
  matrix-free products with the NTK."""
  return _get().empirical_ntk_vp_fn(f, x1, x2, params, **kwargs)
