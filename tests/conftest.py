"""Shared pytest fixtures, and a compilation cache for this test session.

Most of the suite's time is XLA compiling the same ResNet and kernel
programs again: every test builds its own closures, so ``jax.jit`` cannot
reuse what an earlier test compiled. A persistent compilation cache, keyed on
the program text, can. Each test process gets its own empty one for this
session only (JAX writes cache files without a lock, so two processes never
share one); it is deleted when the process exits. Child Python processes that
tests start inherit it through the environment. Set
``JAX_COMPILATION_CACHE_DIR`` yourself to use another, or to ``""`` for none.

For the same reason the tests compile with XLA's CPU backend optimisation
off (``--xla_backend_optimization_level=0`` in ``XLA_FLAGS``, inherited by
child processes): the HLO programs and their arithmetic are the same, LLVM
just spends less time making the machine code fast, which the suite's small
inputs do not need. On 2 cores it cuts about 30 % of a test file's time. Set
``FASTNTK_TEST_XLA_OPT=1`` to test with the optimised backend users run.
"""

import atexit
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import jax
import pytest

_SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def _session_compilation_cache() -> None:
  if "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return  # the user's choice, "" included (no cache)
  worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
  path = tempfile.mkdtemp(prefix=f"fastntk-test-xla-{worker}-")
  atexit.register(shutil.rmtree, path, ignore_errors=True)
  # Every program is cached, however small or quick to compile.
  settings = {"JAX_COMPILATION_CACHE_DIR": path,
              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
  os.environ.update(settings)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


_session_compilation_cache()


def _quick_backend() -> None:
  if os.environ.get("FASTNTK_TEST_XLA_OPT") == "1":
    return
  flags = os.environ.get("XLA_FLAGS", "").split()
  if not any(f.startswith("--xla_backend_optimization_level") for f in flags):
    flags.append("--xla_backend_optimization_level=0")
  # Read when JAX starts its CPU backend, which no test has done yet.
  os.environ["XLA_FLAGS"] = " ".join(flags)


_quick_backend()


@pytest.fixture(scope="session")
def shared_data() -> Path:
  """The offline data folder ``../shared/data`` beside the repository; skips when absent."""
  if not _SHARED_DATA.is_dir():
    pytest.skip(f"../shared/data not present: {_SHARED_DATA.resolve()} does not exist")
  return _SHARED_DATA.resolve()


_LOWERED = "/jax/core/compile/jaxpr_to_mlir_module_duration"


@contextlib.contextmanager
def _lowered():
  seen = []

  def listen(event, seconds, **kw):
    del seconds, kw
    if event == _LOWERED:
      seen.append(event)

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield seen
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)


@pytest.fixture
def lowered_programs():
  """``with lowered_programs() as seen:`` lists every program JAX lowers in
  the block (an in-memory jit cache miss: new code or a new shape), also
  when this session's persistent compilation cache then supplies the
  compiled code, which a count of backend compilations would miss."""
  return _lowered
