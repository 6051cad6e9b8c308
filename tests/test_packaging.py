"""pyproject.toml declares exactly what the package imports, and the lock pins it."""

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Loaded by fastntk_jax.core.nt from its installed files, never declared (its
# release declares TensorFlow); make installs it with --no-deps.
OPTIONAL = {"neural-tangents"}


def _name(requirement: str) -> str:
  return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _imported_distributions() -> set[str]:
  dists = packages_distributions()
  found = set()
  for path in (ROOT / "src" / "fastntk_jax").rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        mods = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        mods = [node.module]
      else:
        continue
      for mod in mods:
        top = mod.split(".")[0]
        if top in sys.stdlib_module_names or top == "fastntk_jax":
          continue
        assert top in dists, f"{path.name} imports {top}, which is not installed"
        found |= {d.lower().replace("_", "-") for d in dists[top]}
  return found


def test_dependencies_are_what_the_package_imports():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  declared = {_name(r) for r in project["dependencies"]}
  imported = _imported_distributions()
  # jaxlib comes with jax; ml_dtypes and the rest are imported directly.
  assert declared == (imported - OPTIONAL - {"jaxlib"}), (declared, imported)


def test_the_lock_pins_every_dependency_and_no_tensorflow():
  lock = {}
  for line in (ROOT / "requirements.lock").read_text().splitlines():
    if line.strip() and not line.startswith("#"):
      name, version = line.split("==")
      lock[name.lower().replace("_", "-")] = version
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  wanted = [_name(r) for r in project["dependencies"]]
  wanted += [_name(r) for r in project["optional-dependencies"]["test"]]
  missing = [w for w in wanted + sorted(OPTIONAL) if w not in lock]
  assert not missing, missing
  assert "tensorflow" not in lock and "tf2jax" not in lock
  # Each floor is the locked (tested) version's major.minor or lower.
  for r in project["dependencies"]:
    m = re.search(r">=([0-9.]+)", r)
    floor = tuple(int(p) for p in m.group(1).split("."))
    got = tuple(int(p) for p in re.findall(r"\d+", lock[_name(r)])[:len(floor)])
    assert floor <= got, (r, lock[_name(r)])


def test_the_version_is_declared_once():
  import fastntk_jax
  meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  assert meta["version"] == fastntk_jax.__version__
