"""Kernels over the PEFT pytree of a ResNet with BatchNorm, against explicit Jacobians."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from fastntk_jax import peft

from fastntk_jax.core import blocking

from fastntk_jax.core import kernels
from fastntk_jax.models import CifarResNet


@pytest.fixture(scope="module")
def resnet():
  model = CifarResNet(depth=20)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  # Non-trivial running statistics, so that inference-mode BatchNorm is not
  # the identity.
  key = jax.random.PRNGKey(1)
  stats = jax.tree_util.tree_map(
      lambda a: a + 0.3 * jax.random.uniform(key, a.shape), variables["batch_stats"])
  variables = {"params": variables["params"], "batch_stats": stats}
  pred = peft.any_of(peft.batchnorm(variables), peft.head())
  apply_fn, w, _ = peft.make_apply_fn(model, variables, pred)
  rng = np.random.default_rng(0)
  x1 = jnp.asarray(rng.normal(size=(6, 32, 32, 3)), jnp.float32)
  x2 = jnp.asarray(rng.normal(size=(3, 32, 32, 3)), jnp.float32)
  return apply_fn, w, x1, x2


def _explicit_jacobian(apply_fn, w, x):
  """Whole-batch reverse-mode Jacobian, (N·C, P): no vmap, no blocking."""
  flat, unravel = ravel_pytree(w)
  return jax.jacrev(lambda f: apply_fn(unravel(f), x).reshape(-1))(flat)


def test_peft_is_batchnorm_and_head(resnet):
  _, w, _, _ = resnet
  assert peft.count_params(w) == 1376 + 650  # BN scale+shift, head 64x10+10


@pytest.mark.parametrize("implementation,reuse", [
    # The per-pair path on a ResNet (~45 s); the same path against explicit
    # Jacobians on an MLP, on one and four devices, is in test_sharding.py.
    pytest.param(1, False, marks=pytest.mark.slow),
    # neural-tangents' second implementation (~18 s); the per-pair path itself
    # is covered by implementation 1.
    pytest.param(2, False, marks=pytest.mark.slow),
    (1, True)])
def test_ntk_matches_explicit_jacobians(resnet, implementation, reuse):
  """neural-tangents per pair of blocks (reuse False) and Jacobians computed
  once and contracted (reuse True) both equal J1 J2ᵀ."""
  apply_fn, w, x1, x2 = resnet
  j1 = _explicit_jacobian(apply_fn, w, x1)
  j2 = _explicit_jacobian(apply_fn, w, x2)
  scale = float(jnp.abs(j1 @ j1.T).max())
  got12 = kernels.ntk(apply_fn, w, x1, x2, implementation=implementation,
                      reuse_jacobians=reuse)
  assert got12.shape == (60, 30)
  np.testing.assert_allclose(got12, j1 @ j2.T, atol=2e-5 * scale)
  got11 = kernels.ntk(apply_fn, w, x1, block_size=4, reuse_jacobians=reuse,
                      implementation=implementation)  # blocks of 4 + 2 (padded)
  np.testing.assert_allclose(got11, j1 @ j1.T, atol=2e-5 * scale)
  np.testing.assert_allclose(got11, got11.T, atol=1e-6 * scale)


def test_ntk_reuses_jacobians_only_when_they_fit(resnet, monkeypatch):
  """Automatic choice: one Jacobian pass per sample when (N1 [+ N2])·C·P
  numbers fit the budget; otherwise neural-tangents per pair of blocks."""
  assert kernels.jacobians_fit(100, None, 10, 1000, 4, budget=4_000_000)
  assert not kernels.jacobians_fit(100, 1, 10, 1000, 4, budget=4_000_000)
  apply_fn, w, x1, _ = resnet
  calls = {"jac": 0, "nt": 0}
  jac, nt = kernels.jacobian, kernels.ntk_block_fn

  def count_jac(*a, **k):
    calls["jac"] += 1
    return jac(*a, **k)

  def count_nt(*a, **k):
    calls["nt"] += 1
    return nt(*a, **k)

  monkeypatch.setattr(kernels, "jacobian", count_jac)
  monkeypatch.setattr(kernels, "ntk_block_fn", count_nt)
  k_auto = kernels.ntk(apply_fn, w, x1, block_size=2)  # 6·10·2026·4 B: fits
  assert calls == {"jac": 1, "nt": 0}  # symmetric: one Jacobian serves both
  monkeypatch.setattr(kernels, "DEFAULT_BLOCK_BYTES", 1000)
  k_nt = kernels.ntk(apply_fn, w, x1, block_size=2)
  assert calls == {"jac": 1, "nt": 1}
  scale = float(jnp.abs(k_nt).max())
  np.testing.assert_allclose(k_auto, k_nt, atol=2e-5 * scale)


def test_jacobian_gram_and_products(resnet):
  apply_fn, w, x1, _ = resnet
  ref = _explicit_jacobian(apply_fn, w, x1)
  scale = float(jnp.abs(ref).max())
  jac = kernels.jacobian(apply_fn, w, x1, block_size=4)
  np.testing.assert_allclose(jac, ref, atol=1e-5 * scale)
  r = jnp.asarray(np.random.default_rng(1).normal(size=(6, 10)), jnp.float32)
  a, b = kernels.gram(apply_fn, w, x1, r, block_size=4)
  np.testing.assert_allclose(a, ref.T @ ref, atol=2e-5 * float(jnp.abs(ref.T @ ref).max()))
  np.testing.assert_allclose(b, ref.T @ r.reshape(-1), atol=2e-5 * float(jnp.abs(ref.T @ r.reshape(-1)).max()))
  flat, unravel = ravel_pytree(w)
  v = jnp.asarray(np.random.default_rng(2).normal(size=flat.shape), jnp.float32)
  jv = kernels.jvp(apply_fn, w, x1, unravel(v), block_size=4)
  np.testing.assert_allclose(jv.reshape(-1), ref @ v, atol=2e-5 * float(jnp.abs(ref @ v).max()))
  jtu = ravel_pytree(kernels.vjp(apply_fn, w, x1, r, block_size=4))[0]
  want = ref.T @ r.reshape(-1)
  np.testing.assert_allclose(jtu, want, atol=2e-5 * float(jnp.abs(want).max()))


def test_gram_with_residuals_from_its_own_pass(resnet):
  """r a function of the block's logits: one pass gives JᵀJ, Jᵀ r(f(x), y)
  and the logits, padding included (6 samples in blocks of 4)."""
  apply_fn, w, x1, _ = resnet
  ref = _explicit_jacobian(apply_fn, w, x1)
  logits = apply_fn(w, x1)
  y = jnp.asarray([3, 1, 4, 1, 5, 9])

  def res(f, t):
    return jax.nn.softmax(f) - jax.nn.one_hot(t, 10, dtype=f.dtype)

  want_b = ref.T @ res(logits, y).reshape(-1)
  for solve_dtype in ("float32", "float64"):
    a, b, f = kernels.gram(apply_fn, w, x1, res, y=y, block_size=4,
                           solve_dtype=solve_dtype, return_outputs=True)
    assert a.dtype == np.dtype(solve_dtype) and f.shape == (6, 10)
    np.testing.assert_allclose(f, logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a, ref.T @ ref,
                               atol=2e-5 * float(jnp.abs(ref.T @ ref).max()))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(a).T)
    np.testing.assert_allclose(b, want_b, atol=2e-5 * float(jnp.abs(want_b).max()))
  # Without r: no gradient, and the logits still come back.
  a0, b0, f0 = kernels.gram(apply_fn, w, x1, block_size=4, return_outputs=True)
  assert b0 is None
  np.testing.assert_allclose(f0, logits, rtol=1e-5, atol=1e-5)


def test_gram_rejects_inconsistent_targets(resnet):
  apply_fn, w, x1, _ = resnet
  res = lambda f, t: f
  with pytest.raises(ValueError, match="y:.*pass the per-sample targets"):
    kernels.gram(apply_fn, w, x1, res)
  with pytest.raises(ValueError, match="y must have one row per sample"):
    kernels.gram(apply_fn, w, x1, res, y=jnp.zeros(5, jnp.int32))
  with pytest.raises(ValueError, match="y is only used with a function r"):
    kernels.gram(apply_fn, w, x1, jnp.zeros((6, 10)), y=jnp.zeros(6))


def test_automatic_jacobian_blocks_are_small_on_cpu(resnet):
  """On CPU, automatic Jacobian blocks stop at CPU_BLOCK_PER_DEVICE samples
  per device (faster there); the neural-tangents pair blocks do not."""
  apply_fn, w, _, _ = resnet
  assert jax.devices()[0].platform == "cpu"
  x = jnp.zeros((64, 32, 32, 3))
  fn = kernels.jac_block_fn(apply_fn)
  block, _, _ = blocking.resolve_block(apply_fn, w, x, None, "jac", fn,
                                       lambda xb: (w, xb))
  assert block == kernels.CPU_BLOCK_PER_DEVICE
  # 100 samples: 7 blocks either way, but of 15 (105 rows), not 16 (112).
  block100, _, _ = blocking.resolve_block(apply_fn, w, jnp.zeros(
      (100, 32, 32, 3)), None, "jac", fn, lambda xb: (w, xb))
  assert block100 == 15
  nt = kernels.ntk_block_fn(apply_fn, 1)
  block_nt, _, _ = blocking.resolve_block(apply_fn, w, x, None, "ntk", nt,
                                          lambda xb: (xb, xb, w))
  assert block_nt > kernels.CPU_BLOCK_PER_DEVICE
  assert blocking.resolve_block(apply_fn, w, x, 48, "jac", fn,
                                lambda xb: (w, xb))[0] == 48  # explicit wins
  # stable=True: the block of a large input, whatever the input's size
  # (short inputs are padded to it): one compiled shape for every size.
  for n in (1, 3, 100, 64):
    got, _, _ = blocking.resolve_block(apply_fn, w, jnp.zeros(
        (n, 32, 32, 3)), None, "jac", fn, lambda xb: (w, xb), stable=True)
    assert got == kernels.CPU_BLOCK_PER_DEVICE
  assert blocking.resolve_block(apply_fn, w, x[:3], 8, "jac", fn,
                                lambda xb: (w, xb), stable=True)[0] == 8
  # A given block caps the bucket (a power of two, at least 16): a short
  # input is not padded to a large block.
  for n, want in ((3, 16), (17, 32), (100, 128), (300, 256)):
    got, _, _ = blocking.resolve_block(apply_fn, w, jnp.zeros(
        (n, 32, 32, 3)), 256, "jac", fn, lambda xb: (w, xb), stable=True)
    assert got == want


def test_tail_blocks_pad_a_short_last_block_to_a_quarter_bucket():
  tb = blocking.tail_block
  assert [tb(r, 16) for r in (1, 4, 5, 8, 9, 13, 16)] == [4, 4, 8, 8, 12, 16,
                                                           16]
  assert tb(4, 32, 2) == 8 and tb(9, 32, 2) == 16 and tb(32, 32, 2) == 32
  assert tb(3, 32, 4) == 8  # a multiple of the devices
  assert {tb(r, 32, 2) for r in range(1, 33)} == {8, 16, 24, 32}
  assert tb(1, 2) == 1 and tb(2, 2) == 2


def test_stable_shapes_give_the_same_grams_and_logits(resnet):
  """gram/predict with stable_shape=True (a short input padded to a whole
  block, NumPy inputs kept on the host): the values of the default path."""
  apply_fn, w, x1, _ = resnet
  y = np.asarray([3, 1, 4, 1, 5, 9])
  res = lambda f, t: f - jax.nn.one_hot(t, 10, dtype=f.dtype)
  for x in (x1[:3], np.asarray(x1)):
    n = x.shape[0]
    a, b, f = kernels.gram(apply_fn, w, x, res, y=y[:n], solve_dtype="float64",
                           return_outputs=True)
    a2, b2, f2 = kernels.gram(apply_fn, w, x, res, y=y[:n],
                              solve_dtype="float64", return_outputs=True,
                              stable_shape=True)
    np.testing.assert_allclose(a2, a, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(b2, b, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(f2, f, rtol=1e-6, atol=1e-6)
    assert f2.shape == (n, 10)
    p = kernels.predict(apply_fn, w, x, block_size=4, stable_shape=True)
    np.testing.assert_allclose(p, apply_fn(w, jnp.asarray(x)), rtol=1e-5,
                               atol=1e-5)
    assert p.shape == (n, 10)


def test_train_mode_batchnorm_couples_samples(resnet):
  """Why the kernels need inference-mode BatchNorm: in training mode a
  sample's logits change when another sample of the batch changes."""
  _, _, x1, _ = resnet
  model = CifarResNet(depth=20)
  variables = model.init(jax.random.PRNGKey(0), x1[:1])
  f = lambda x: model.apply(variables, x, train=True, mutable=["batch_stats"])[0]
  g = lambda x: model.apply(variables, x, train=False)
  x_changed = x1.at[1].add(1.0)
  assert not np.allclose(f(x1)[0], f(x_changed)[0], atol=1e-4)
  np.testing.assert_allclose(g(x1)[0], g(x_changed)[0], atol=1e-6)


def test_auto_block_size_bounds_memory():
  mib = 2**20
  assert kernels.auto_block_size(1000, 16 * mib, 2048 * mib) == 128
  assert kernels.auto_block_size(1000, 16 * mib, 2000 * mib) == 64  # power of 2 below 125
  assert kernels.auto_block_size(100, 16 * mib, 2048 * mib) == 100  # all fits
  assert kernels.auto_block_size(10, 10**12) == 1  # never below one sample


def test_balanced_blocks_pad_less_and_keep_the_block_count():
  bb = blocking.balanced_block
  assert bb(100, 16) == 15  # 7 blocks: 105 rows, not 112
  assert bb(100, 32, 2) == 26  # 4 blocks of 13 a device: 104, not 128
  assert bb(64, 16) == 16 and bb(10, 16) == 10 and bb(1, 16) == 1
  assert bb(10, 16, 4) == 12  # a multiple of the devices
  for n in range(1, 400):
    for block in (1, 3, 16, 32):
      b = bb(n, block)
      assert b <= block and -(-n // b) == -(-n // block)  # no more blocks
      assert -(-n // b) * b - n < -(-n // b)  # under one padded row a block
  # Large n keeps the block (and its compiled shape).
  assert all(bb(n, 16) == 16 for n in range(256, 2000))


def test_block_size_from_measured_working_memory(resnet):
  """The automatic block keeps the probe-measured working memory in budget."""
  apply_fn, w, x1, _ = resnet
  fn = kernels.ntk_block_fn(apply_fn, 1)
  per = blocking.bytes_per_sample("ntk", fn, lambda xb: (xb, xb, w), w, x1,
                                  fallback=0.0)
  assert 1e6 < per < 1e9  # ResNet-20 PEFT: ~16 MiB a sample on CPU
  block = kernels.auto_block_size(10_000, per)
  assert block * per <= kernels.DEFAULT_BLOCK_BYTES
  assert 2 * block * per > kernels.DEFAULT_BLOCK_BYTES


def test_symmetric_kernel_from_kept_jacobians_takes_two_kernel_buffers():
  """``ntk(x, reuse_jacobians=True)`` forms J Jᵀ and symmetrises it in one
  program: the compiled program holds the product and the result, two
  (N·C)² buffers, where an eager ½(K + Kᵀ) after the product held three."""
  rng = np.random.default_rng(0)
  j = jnp.asarray(rng.normal(size=(512, 64)), jnp.float32)
  fn = kernels._gram_rows_fn(None)
  assert kernels._gram_rows_fn(None) is fn  # one jitted program per mesh
  k = fn(j)
  np.testing.assert_array_equal(np.asarray(k), np.asarray(k).T)
  np.testing.assert_allclose(np.asarray(k), np.asarray(j) @ np.asarray(j).T,
                             rtol=1e-5, atol=1e-4)
  mem = fn.lower(j).compile().memory_analysis()
  if mem is None:
    pytest.skip("this backend reports no memory analysis")
  kernel_bytes = 512 * 512 * 4
  assert mem.output_size_in_bytes == kernel_bytes
  assert mem.temp_size_in_bytes <= 1.1 * kernel_bytes


def test_symmetric_ntk_from_kept_jacobians_goes_through_the_fused_program(
    monkeypatch):
  """``ntk(x, reuse_jacobians=True)`` takes its symmetric kernel from the
  fused program, not an eager ½(K + Kᵀ) after the product."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)
  calls = []
  fused = kernels._gram_rows_fn

  def counting(mesh):
    calls.append(mesh)
    return fused(mesh)

  monkeypatch.setattr(kernels, "_gram_rows_fn", counting)
  k = kernels.ntk(lambda p, xs: xs @ p, w, x, reuse_jacobians=True)
  assert len(calls) == 1
  np.testing.assert_allclose(np.asarray(k),
                             np.kron(np.asarray(x) @ np.asarray(x).T,
                                     np.eye(2)), rtol=1e-5, atol=1e-5)
