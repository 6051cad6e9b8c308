"""Wall time and the part of it JAX spent tracing and compiling.

:func:`measure` is a context manager. On exit, the object it yields holds
``seconds`` (wall time of the block) and ``compile_seconds`` (the time inside
that block that JAX reported as compilation work). Compilation is observed
through ``jax.monitoring``: one process-wide listener, registered lazily on
the first :func:`measure`, receives the duration events JAX 0.10 emits for
every compiled computation::

  /jax/core/compile/jaxpr_trace_duration          # Python tracing to a jaxpr
  /jax/core/compile/jaxpr_to_mlir_module_duration # lowering to StableHLO
  /jax/core/compile/backend_compile_duration      # XLA compilation

(verified on jax 0.10.2: a fresh ``jax.jit`` function's first call emits one
of each; a second call with the same shapes emits none). Each event is taken
as the interval ``[now − duration, now]`` and credited to every measurement
open on the calling thread (a thread-local stack: nested measurements both
count it). On exit the union of those intervals, clipped to the block, is the
compile time, so overlapping or nested events are not counted twice and
``compile_seconds ≤ seconds`` always holds.

Example::

  with timing.measure() as m:
    out = jitted(x).block_until_ready()
  print(m.seconds, m.compile_seconds)
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import NamedTuple

import jax

__all__ = ["COMPILE_EVENTS", "Measured", "Measurement", "measure"]

#: The ``jax.monitoring`` duration events counted as compilation.
COMPILE_EVENTS = frozenset({
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
})


class Measured(NamedTuple):
  """Attributes: ``seconds`` (wall time) and ``compile_seconds`` (its part
  spent tracing, lowering and compiling)."""
  seconds: float
  compile_seconds: float


class Measurement:
  """What :func:`measure` yields; ``seconds`` and ``compile_seconds`` are NaN
  until the block exits, then final."""

  __slots__ = ("seconds", "compile_seconds", "_start", "_intervals")

  def __init__(self):
    self.seconds = float("nan")
    self.compile_seconds = float("nan")
    self._start = time.perf_counter()
    self._intervals: list[tuple[float, float]] = []

  def result(self) -> Measured:
    """The final figures as an immutable :class:`Measured`."""
    return Measured(self.seconds, self.compile_seconds)

  def __repr__(self) -> str:
    return (f"Measurement(seconds={self.seconds:.4g}, "
            f"compile_seconds={self.compile_seconds:.4g})")

  def _finish(self) -> None:
    end = time.perf_counter()
    self.seconds = end - self._start
    self.compile_seconds = _union_length(self._intervals, self._start, end)


_local = threading.local()
_lock = threading.Lock()
_registered = False


def _stack() -> list[Measurement]:
  stack = getattr(_local, "stack", None)
  if stack is None:
    stack = _local.stack = []
  return stack


def _listener(event: str, duration: float, **kwargs) -> None:
  del kwargs  # fun_name etc.; not needed for the sum
  if event not in COMPILE_EVENTS:
    return
  stack = getattr(_local, "stack", None)
  if not stack:
    return
  end = time.perf_counter()
  interval = (end - float(duration), end)
  for m in stack:
    m._intervals.append(interval)  # pylint: disable=protected-access


def _ensure_listener() -> None:
  global _registered
  with _lock:  # two threads entering their first measure() at once
    if not _registered:
      jax.monitoring.register_event_duration_secs_listener(_listener)
      _registered = True


def _union_length(intervals, lo: float, hi: float) -> float:
  """Total length of the union of ``intervals`` clipped to ``[lo, hi]``."""
  total, cur_a, cur_b = 0.0, None, None
  for a, b in sorted((max(a, lo), min(b, hi)) for a, b in intervals):
    if b <= a:
      continue
    if cur_b is None or a > cur_b:
      if cur_b is not None:
        total += cur_b - cur_a
      cur_a, cur_b = a, b
    else:
      cur_b = max(cur_b, b)
  if cur_b is not None:
    total += cur_b - cur_a
  return total


@contextlib.contextmanager
def measure() -> Iterator[Measurement]:
  """Times the ``with`` block and the JAX compilation inside it.

  The block should end with ``jax.block_until_ready`` on its results, or the
  time of work still queued on the device is missed.

  Yields:
    A :class:`Measurement` whose ``seconds`` and ``compile_seconds`` are set
    when the block exits (also when it raises).
  """
  _ensure_listener()
  m = Measurement()
  stack = _stack()
  stack.append(m)
  try:
    yield m
  finally:
    # Remove this measurement (normally the top) before finishing it.
    for i in range(len(stack) - 1, -1, -1):
      if stack[i] is m:
        del stack[i]
        break
    m._finish()  # pylint: disable=protected-access
