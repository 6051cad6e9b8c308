"""Where a Fast-NTK pass spends its time: Jacobian rows vs Gram accumulation.

ResNet-20, BatchNorm + head (P = 2,026), 1,024 embedded CIFAR-10 images in blocks
of 256; prints the seconds of the Jacobian blocks and of the float32/float64
Gram accumulation (warm calls), and of kernels.gram end to end.

    python benchmarks/profile_jacobian.py
"""
import time, jax, jax.numpy as jnp, numpy as np
from fastntk_jax import zoo, kernels, data
m, v, pre = zoo.load_backbone("resnet20")
model = zoo.prepare("resnet20", m, v, num_classes=10, mode="peft", seed=0)
x = data.load_embedded_cifar10()[0][:1000]
xn = jax.jit(zoo.preprocess_fn("resnet20"))(jnp.asarray(x))
xn = jnp.concatenate([xn, xn[:24]])  # 1024
r = jnp.zeros((1024, 10))
fn = kernels._jac_block_fn(model.apply_fn)
res, _, _ = kernels._resolve_block(model.apply_fn, model.init_params, xn, None, "jac", fn, lambda xb: (model.init_params, xb))
print("auto block", res)
jb = fn(model.init_params, xn[:256]); jax.block_until_ready(jb)
t = time.perf_counter()
for i in range(4): jb = fn(model.init_params, xn[i*256:(i+1)*256]); jax.block_until_ready(jb)
print("J 1024 (4 blocks of 256)", time.perf_counter() - t)
for prec in ("float32", "float64"):
  with kernels.precision_scope(prec):
    dt = np.dtype(prec)
    acc = kernels._accumulate_fn(None)
    a = jnp.zeros((2026, 2026), dt); b = jnp.zeros((2026,), dt)
    keep = jnp.ones((2560,), jnp.float32); rb = jnp.zeros((2560,), jnp.float32)
    a, b = acc(a, b, jb, rb, keep); jax.block_until_ready(a)
    t = time.perf_counter()
    for i in range(4): a, b = acc(a, b, jb, rb, keep); jax.block_until_ready(a)
    print("accumulate", prec, "4 blocks of 2560 rows", time.perf_counter() - t)
t = time.perf_counter(); a, b = kernels.gram(model.apply_fn, model.init_params, xn, r, precision="float64"); jax.block_until_ready(a); print("gram f64 1024 total", time.perf_counter() - t)
