"""Tests for fastntk_jax.data.splits."""

import numpy as np
import pytest

from fastntk_jax.data.splits import (
  ForgetSpec,
  apply_forget,
  class_subset,
  first_per_class,
  forget_classes,
  forget_random,
  parse_forget,
)

NAMES = ("airplane", "automobile", "bird", "cat")
Y = np.array([3, 0, 0, 1, 3, 2, 0, 1, 2, 3, 1, 2])


def _check_partition(retain, forget, n):
  for idx in (retain, forget):
    assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)  # sorted, unique
  assert np.intersect1d(retain, forget).size == 0
  np.testing.assert_array_equal(np.union1d(retain, forget), np.arange(n))


def test_first_per_class():
  np.testing.assert_array_equal(first_per_class(Y, 2), [0, 1, 2, 3, 4, 5, 7, 8])
  np.testing.assert_array_equal(first_per_class(Y, 1, class_names=NAMES), [0, 1, 3, 5])
  with pytest.raises(ValueError, match=r"ipc=4 but class 0 \('airplane'\) has only 3"):
    first_per_class(Y, 4, class_names=NAMES)
  with pytest.raises(ValueError, match=r"class 4 \('extra'\) has only 0"):
    first_per_class(Y, 1, class_names=NAMES + ("extra",))
  with pytest.raises(ValueError, match="k must be a positive int"):
    first_per_class(Y, 0)


def test_class_subset():
  np.testing.assert_array_equal(class_subset(Y, [2, 0]), [1, 2, 5, 6, 8, 11])
  for bad, match in (([], "empty"), ([1, 1], "twice"), ([-1], "non-negative"), ("0", "string")):
    with pytest.raises(ValueError, match=match):
      class_subset(Y, bad)
  for bad_y, match in (([[1]], "1-D"), ([], "empty"), ([0.5], "integer"), ([-1, 2], "negative")):
    with pytest.raises(ValueError, match=match):
      class_subset(bad_y, [0])


def test_forget_classes():
  retain, forget = forget_classes(Y, [3, 1])
  _check_partition(retain, forget, Y.size)
  np.testing.assert_array_equal(forget, [0, 3, 4, 7, 9, 10])
  with pytest.raises(ValueError, match="forget set is empty"):
    forget_classes(Y, [7])
  with pytest.raises(ValueError, match="whole data"):
    forget_classes(Y, [0, 1, 2, 3])


def test_forget_random_is_reproducible_and_sized():
  y = np.zeros(1000, dtype=np.int32)
  retain, forget = forget_random(y, 0.1, seed=3)
  _check_partition(retain, forget, y.size)
  assert forget.size == 100
  again = forget_random(y, 0.1, seed=3)
  np.testing.assert_array_equal(again[1], forget)
  other = forget_random(y, 0.1, seed=4)[1]
  assert not np.array_equal(other, forget)
  assert forget_random(y, 0.0001)[1].size == 1  # at least one sample
  assert forget_random(y, 0.1234)[1].size == 123
  assert forget_random(np.zeros(3, int), 0.5)[1].size == 2  # rounds half up


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, float("nan"), True, "0.1"])
def test_forget_random_bad_fraction(fraction):
  with pytest.raises(ValueError, match="fraction must be a number in"):
    forget_random(Y, fraction)


def test_forget_random_errors():
  with pytest.raises(ValueError, match="seed must be a non-negative int"):
    forget_random(Y, 0.5, seed=-1)
  with pytest.raises(ValueError, match="whole data"):
    forget_random(np.zeros(2, int), 0.9)
  with pytest.raises(ValueError, match="whole data"):
    forget_random(np.zeros(1, int), 0.1)  # one sample: forgetting "at least one" is all


@pytest.mark.parametrize(
  "text, spec",
  [
    ("class:0", ForgetSpec("class", classes=(0,))),
    ("class:0,3", ForgetSpec("class", classes=(0, 3))),
    ("class:cat", ForgetSpec("class", classes=("cat",))),
    (" class: cat , 2 ", ForgetSpec("class", classes=("cat", 2))),
    ("random:0.1", ForgetSpec("random", fraction=0.1, seed=0)),
    ("random:0.1:seed=3", ForgetSpec("random", fraction=0.1, seed=3)),
    ("RANDOM:1e-2:seed=7", ForgetSpec("random", fraction=0.01, seed=7)),
  ],
)
def test_parse_forget(text, spec):
  parsed = parse_forget(text)
  assert parsed == spec
  assert parse_forget(str(parsed)) == parsed  # str() is the canonical form


@pytest.mark.parametrize(
  "text, match",
  [
    ("class:", "empty class"),
    ("class:0,,1", "empty class"),
    ("class:1,1", "twice"),
    ("random:", "cannot parse"),
    ("random:abc", "not a number"),
    ("random:1.5", r"must lie in \(0, 1\)"),
    ("random:0", r"must lie in \(0, 1\)"),
    ("random:nan", r"must lie in \(0, 1\)"),
    ("random:0.1:seed=-1", "cannot parse"),
    ("random:0.1:sed=1", "cannot parse"),
    ("forget everything", "unknown forget spec"),
    ("", "unknown forget spec"),
  ],
)
def test_parse_forget_errors(text, match):
  with pytest.raises(ValueError, match=match):
    parse_forget(text)


def test_apply_forget():
  retain, forget = apply_forget("class:cat,1", Y, NAMES)
  _check_partition(retain, forget, Y.size)
  np.testing.assert_array_equal(forget, forget_classes(Y, [3, 1])[1])
  r1 = apply_forget(parse_forget("random:0.25:seed=1"), Y, NAMES)
  np.testing.assert_array_equal(r1[1], forget_random(Y, 0.25, seed=1)[1])
  assert r1[1].size == 3
  with pytest.raises(ValueError, match="unknown class 'dog'.*'airplane'"):
    apply_forget("class:dog", Y, NAMES)
  with pytest.raises(ValueError, match=r"class 4 in forget spec is out of range; use 0\.\.3"):
    apply_forget("class:4", Y, NAMES)
  with pytest.raises(ValueError, match="twice"):
    apply_forget("class:0,airplane", Y, NAMES)
  with pytest.raises(ValueError, match="whole data"):
    apply_forget("class:0,1,2,3", Y, NAMES)
  with pytest.raises(ValueError, match="forget set is empty"):
    apply_forget("class:cat", Y[Y != 3], NAMES)
  with pytest.raises(ValueError, match="only 3 class_names"):
    apply_forget("class:0", Y, NAMES[:3])
