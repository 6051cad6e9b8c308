"""The package's layout: layers, no import cycle, no private names across
modules, short functions."""

import ast
import pathlib

import fastntk_jax

ROOT = pathlib.Path(fastntk_jax.__file__).resolve().parent
EDGE = ("cli", "data", "evaluation", "experiments", "io", "methods", "models",
        "store", "training")


def _modules():
  out = {}
  for p in ROOT.rglob("*.py"):
    parts = ("fastntk_jax",) + p.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = ast.parse(p.read_text())
  return out


MODULES = _modules()


def _imports(tree):
  """``(module, name)`` of every ``from fastntk_jax... import name`` and
  ``(module, None)`` of every ``import fastntk_jax...``, lazy ones included."""
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
        "fastntk_jax"):
      for a in node.names:
        yield node.module, a.name
    elif isinstance(node, ast.Import):
      for a in node.names:
        if a.name.startswith("fastntk_jax"):
          yield a.name, None


def _deps(name):
  for mod, item in _imports(MODULES[name]):
    sub = f"{mod}.{item}"
    yield sub if sub in MODULES else mod


def test_every_layer_has_its_folder():
  for sub in ("core",) + EDGE + ("peft",):
    assert (ROOT / sub / "__init__.py").is_file(), sub
  top = sorted(p.name for p in ROOT.glob("*.py"))
  assert top == ["__init__.py"], top


def test_the_core_imports_nothing_from_the_edge():
  for name in MODULES:
    if name.startswith("fastntk_jax.core"):
      outside = [d for d in _deps(name) if not d.startswith("fastntk_jax.core")]
      assert not outside, (name, outside)


def test_there_is_no_import_cycle():
  graph = {m: {d for d in _deps(m) if d in MODULES and d != m
               and not d.startswith(m + ".")} for m in MODULES}
  state = {}

  def visit(m, path):
    state[m] = "open"
    for d in graph[m]:
      assert state.get(d) != "open", " -> ".join(path + [m, d])
      if d not in state:
        visit(d, path + [m])
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m, [])


def test_no_private_name_crosses_a_module_boundary():
  for name, tree in MODULES.items():
    for mod, item in _imports(tree):
      assert not any(part.startswith("_") for part in mod.split(".")), (
          name, mod)
      assert item is None or not item.startswith("_"), (name, mod, item)
    # module._private attribute access on an imported fastntk_jax module.
    aliases = {a.asname or a.name for node in ast.walk(tree)
               if isinstance(node, ast.ImportFrom)
               and (node.module or "").startswith("fastntk_jax")
               for a in node.names
               if f"{node.module}.{a.name}" in MODULES}
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in aliases and node.attr.startswith("_")
          and not node.attr.startswith("__")):
        raise AssertionError(f"{name}: {node.value.id}.{node.attr}")


def test_functions_are_at_most_80_lines():
  long = []
  for name, tree in MODULES.items():
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        lines = node.end_lineno - node.lineno + 1
        if lines > 80:
          long.append((name, node.name, lines))
  assert not long, long


def test_the_test_would_see_a_cycle_or_a_private_import():
  # The checks above are only as good as _imports: it must see lazy imports
  # inside functions and private names.
  tree = ast.parse("def f():\n  from fastntk_jax.core.kernels import _x\n")
  assert list(_imports(tree)) == [("fastntk_jax.core.kernels", "_x")]
