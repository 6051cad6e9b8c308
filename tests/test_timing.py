"""Tests of fastntk_jax.evaluation.timing (wall time and JAX compile time)."""

import threading
import time

import jax
import jax.numpy as jnp
import pytest
from jax._src import monitoring as _monitoring

from fastntk_jax.evaluation import timing


def _fresh_fn():
  # A new function object each call: jit's cache cannot have seen it.
  return jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x).T + jnp.tanh(x).sum())


def test_first_call_compiles_second_does_not():
  f, x = _fresh_fn(), jnp.ones((16, 16))
  with timing.measure() as first:
    f(x).block_until_ready()
  with timing.measure() as second:
    f(x).block_until_ready()
  assert first.compile_seconds > 0
  assert first.compile_seconds <= first.seconds
  assert second.compile_seconds == pytest.approx(0.0, abs=1e-4)
  assert 0 <= second.compile_seconds <= second.seconds
  assert isinstance(first.result(), timing.Measured)
  assert first.result() == (first.seconds, first.compile_seconds)


def test_values_are_nan_inside_the_block():
  with timing.measure() as m:
    assert m.seconds != m.seconds  # NaN until exit
  assert m.seconds >= 0


def test_wall_time_includes_sleep():
  with timing.measure() as m:
    time.sleep(0.05)
  assert m.seconds >= 0.05 and m.compile_seconds == 0.0


def test_nested_measures_both_count():
  f, g, x = _fresh_fn(), _fresh_fn(), jnp.ones((8, 8))
  with timing.measure() as outer:
    f(x).block_until_ready()
    with timing.measure() as inner:
      g(x).block_until_ready()
  assert inner.compile_seconds > 0
  assert outer.compile_seconds > inner.compile_seconds  # f's and g's
  assert outer.compile_seconds <= outer.seconds
  assert inner.seconds <= outer.seconds


def test_other_threads_are_not_counted():
  x = jnp.ones((8, 8))

  def work():
    _fresh_fn()(x).block_until_ready()

  with timing.measure() as m:
    t = threading.Thread(target=work)
    t.start()
    t.join()
  assert m.compile_seconds == 0.0


def test_exception_still_finishes_and_pops():
  with pytest.raises(RuntimeError):
    with timing.measure() as m:
      raise RuntimeError("boom")
  assert m.seconds >= 0
  assert timing._stack() == []  # pylint: disable=protected-access


def test_one_listener_registered_once():
  for _ in range(3):
    with timing.measure():
      pass
  listeners = _monitoring.get_event_duration_listeners()
  assert sum(l is timing._listener for l in listeners) == 1  # pylint: disable=protected-access


def test_jax_emits_the_compile_events_we_count():
  seen = []

  def spy(event, duration, **kwargs):
    seen.append(event)

  jax.monitoring.register_event_duration_secs_listener(spy)
  try:
    _fresh_fn()(jnp.ones((4, 4))).block_until_ready()
  finally:
    jax.monitoring.unregister_event_duration_listener(spy)
  assert timing.COMPILE_EVENTS <= set(seen)


def test_union_length_hand_checked():
  u = timing._union_length  # pylint: disable=protected-access
  assert u([], 0, 10) == 0
  assert u([(1, 3), (2, 5), (7, 8)], 0, 10) == pytest.approx(5)  # [1,5]+[7,8]
  assert u([(1, 3), (1.5, 2)], 0, 10) == pytest.approx(2)  # nested
  assert u([(-2, 1), (9, 12)], 0, 10) == pytest.approx(2)  # clipped
