"""Pretrained ViT checkpoints in the vision_transformer, big_vision and timm layouts.

Each layout's checkpoint is written here in exactly that layout (``np.savez``
with the '/'-joined keys of the Flax codes; ``safetensors.numpy.save_file``
with timm's names and PyTorch conventions) and compared with a forward pass
written in that code's own conventions, in float64 NumPy.
"""

import math

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy as st
from scipy.special import erf

from fastntk_jax.models import zoo
from fastntk_jax.models import vit_checkpoints as vc

D, H, M, P, G, DEPTH, C = 32, 2, 64, 4, 4, 2, 5  # width, heads, mlp, patch, grid
DH = D // H


def _rng(seed=0):
  return np.random.default_rng(seed)


def _images(n=3, side=G * P, seed=1):
  return _rng(seed).normal(size=(n, side, side, 3)).astype(np.float32)


# ----------------------------------------------------------------- writers

def _google(layout, *, prefix=None, scanned=False, seed=0, cls=True,
            pre_logits=False):
  """Random arrays under the key names of google-research/vision_transformer
  (``layout="vt"``) or big_vision (``"bv"``)."""
  r = _rng(seed)
  n = lambda *s: (0.3 * r.normal(size=s)).astype(np.float32)
  vt = layout == "vt"
  prefix = ("" if vt else "params/") if prefix is None else prefix
  mha, ln2, mlp = (1, 2, 3) if vt else (0, 1, 0)
  a = {"embedding/kernel": n(P, P, 3, D), "embedding/bias": n(D),
       "Transformer/encoder_norm/scale": 1 + n(D),
       "Transformer/encoder_norm/bias": n(D),
       "head/kernel": n(D, C), "head/bias": n(C)}
  if cls:
    a["cls"] = n(1, 1, D)
  if vt:
    a["Transformer/posembed_input/pos_embedding"] = n(1, G * G + 1, D)
  else:
    a["pos_embedding"] = n(1, G * G, D)
  if pre_logits:
    a["pre_logits/kernel"], a["pre_logits/bias"] = n(D, D), n(D)
  blocks = []
  for _ in range(DEPTH):
    b = {"LayerNorm_0/scale": 1 + n(D), "LayerNorm_0/bias": n(D),
         f"LayerNorm_{ln2}/scale": 1 + n(D), f"LayerNorm_{ln2}/bias": n(D),
         f"MlpBlock_{mlp}/Dense_0/kernel": n(D, M),
         f"MlpBlock_{mlp}/Dense_0/bias": n(M),
         f"MlpBlock_{mlp}/Dense_1/kernel": n(M, D),
         f"MlpBlock_{mlp}/Dense_1/bias": n(D)}
    att = f"MultiHeadDotProductAttention_{mha}"
    for name in ("query", "key", "value"):
      b[f"{att}/{name}/kernel"] = n(D, H, DH)
      b[f"{att}/{name}/bias"] = n(H, DH)
    b[f"{att}/out/kernel"], b[f"{att}/out/bias"] = n(H, DH, D), n(D)
    blocks.append(b)
  if scanned:
    for k in blocks[0]:
      a[f"Transformer/encoderblock/{k}"] = np.stack([b[k] for b in blocks])
  else:
    for i, b in enumerate(blocks):
      a.update({f"Transformer/encoderblock_{i}/{k}": v for k, v in b.items()})
  return {prefix + k: v for k, v in a.items()}


def _timm(seed=0, qkv_bias=True):
  r = _rng(seed)
  n = lambda *s: (0.3 * r.normal(size=s)).astype(np.float32)
  a = {"cls_token": n(1, 1, D), "pos_embed": n(1, G * G + 1, D),
       "patch_embed.proj.weight": n(D, 3, P, P), "patch_embed.proj.bias": n(D),
       "norm.weight": 1 + n(D), "norm.bias": n(D),
       "head.weight": n(C, D), "head.bias": n(C)}
  for i in range(DEPTH):
    b = f"blocks.{i}."
    a.update({b + "norm1.weight": 1 + n(D), b + "norm1.bias": n(D),
              b + "norm2.weight": 1 + n(D), b + "norm2.bias": n(D),
              b + "attn.qkv.weight": n(3 * D, D),
              b + "attn.proj.weight": n(D, D), b + "attn.proj.bias": n(D),
              b + "mlp.fc1.weight": n(M, D), b + "mlp.fc1.bias": n(M),
              b + "mlp.fc2.weight": n(D, M), b + "mlp.fc2.bias": n(D)})
    if qkv_bias:
      a[b + "attn.qkv.bias"] = n(3 * D)
  return a


# ----------------------------------------------------------------- references

def _ln(x, scale, bias, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * scale + bias


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _ref_google(a, x, layout, prefix=None, scanned=False):
  """The Flax codes' ViT: (D, H, d) attention kernels, tanh GELU; big_vision
  adds the position embedding before prepending the class token."""
  vt = layout == "vt"
  prefix = ("" if vt else "params/") if prefix is None else prefix
  g = lambda k: np.asarray(a[prefix + k], np.float64)
  mha, ln2, mlp = (1, 2, 3) if vt else (0, 1, 0)
  x = np.asarray(x, np.float64)
  n, side = x.shape[0], x.shape[1]
  gr = side // P
  patches = x.reshape(n, gr, P, gr, P, 3).transpose(0, 1, 3, 2, 4, 5)
  tok = patches.reshape(n, gr * gr, -1) @ g("embedding/kernel").reshape(-1, D)
  tok = tok + g("embedding/bias")
  cls = np.broadcast_to(g("cls"), (n, 1, D))
  if vt:
    z = np.concatenate([cls, tok], 1) + g("Transformer/posembed_input/pos_embedding")
  else:
    z = np.concatenate([cls, tok + g("pos_embedding")], 1)
  for i in range(DEPTH):
    if scanned:
      b = lambda k: g(f"Transformer/encoderblock/{k}")[i]
    else:
      b = lambda k: g(f"Transformer/encoderblock_{i}/{k}")
    att = f"MultiHeadDotProductAttention_{mha}/"
    y = _ln(z, b("LayerNorm_0/scale"), b("LayerNorm_0/bias"))
    q, k, v = (np.einsum("nsD,Dhd->nshd", y, b(att + f"{m}/kernel"))
               + b(att + f"{m}/bias") for m in ("query", "key", "value"))
    w = _softmax(np.einsum("nqhd,nkhd->nhqk", q, k) / math.sqrt(DH))
    o = np.einsum("nhqk,nkhd->nqhd", w, v)
    z = z + np.einsum("nqhd,hdD->nqD", o, b(att + "out/kernel")) + b(att + "out/bias")
    y = _ln(z, b(f"LayerNorm_{ln2}/scale"), b(f"LayerNorm_{ln2}/bias"))
    h = y @ b(f"MlpBlock_{mlp}/Dense_0/kernel") + b(f"MlpBlock_{mlp}/Dense_0/bias")
    h = 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    z = z + h @ b(f"MlpBlock_{mlp}/Dense_1/kernel") + b(f"MlpBlock_{mlp}/Dense_1/bias")
  z = _ln(z, g("Transformer/encoder_norm/scale"), g("Transformer/encoder_norm/bias"))
  return z[:, 0] @ g("head/kernel") + g("head/bias")


def _ref_timm(a, x):
  """timm's VisionTransformer: NCHW convolution, Linear = x Wᵀ + b, a fused
  qkv projection split as (3, H, d), exact GELU."""
  g = lambda k: np.asarray(a[k], np.float64)
  x = np.asarray(x, np.float64).transpose(0, 3, 1, 2)  # NCHW
  n, _, side, _ = x.shape
  gr = side // P
  patches = x.reshape(n, 3, gr, P, gr, P).transpose(0, 2, 4, 1, 3, 5)
  tok = patches.reshape(n, gr * gr, -1) @ g("patch_embed.proj.weight").reshape(D, -1).T
  z = np.concatenate([np.broadcast_to(g("cls_token"), (n, 1, D)),
                      tok + g("patch_embed.proj.bias")], 1) + g("pos_embed")
  for i in range(DEPTH):
    b = lambda k: g(f"blocks.{i}.{k}")
    y = _ln(z, b("norm1.weight"), b("norm1.bias"))
    bias = b("attn.qkv.bias") if f"blocks.{i}.attn.qkv.bias" in a else 0.0
    qkv = (y @ b("attn.qkv.weight").T + bias).reshape(n, -1, 3, H, DH)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    w = _softmax(np.einsum("nqhd,nkhd->nhqk", q, k) / math.sqrt(DH))
    o = np.einsum("nhqk,nkhd->nqhd", w, v).reshape(n, -1, D)
    z = z + o @ b("attn.proj.weight").T + b("attn.proj.bias")
    y = _ln(z, b("norm2.weight"), b("norm2.bias"))
    h = y @ b("mlp.fc1.weight").T + b("mlp.fc1.bias")
    h = 0.5 * h * (1 + erf(h / math.sqrt(2)))
    z = z + h @ b("mlp.fc2.weight").T + b("mlp.fc2.bias")
  z = _ln(z, g("norm.weight"), g("norm.bias"))
  return z[:, 0] @ g("head.weight").T + g("head.bias")


def _save_npz(tmp_path, arrays, name="ckpt.npz"):
  path = tmp_path / name
  np.savez(path, **arrays)
  return path


def _save_st(tmp_path, arrays, name="model.safetensors"):
  path = tmp_path / name
  st.save_file(arrays, str(path))
  return path


# ----------------------------------------------------------------- forward pass

GOOGLE_CASES = [("vt", None, False), ("vt", "opt/target/", False),
                ("bv", None, False), ("bv", None, True), ("bv", "params/img/", False)]


@pytest.mark.parametrize("layout,prefix,scanned", GOOGLE_CASES)
def test_google_layouts_give_the_checkpoints_forward_pass(tmp_path, layout, prefix,
                                                          scanned):
  a = _google(layout, prefix=prefix, scanned=scanned)
  module, variables, info = vc.load_vit(_save_npz(tmp_path, a), num_prompts=0)
  assert info.layout == {"vt": "vision_transformer", "bv": "big_vision"}[layout]
  assert (info.width, info.depth, info.mlp_dim, info.patch_size, info.grid,
          info.num_heads, info.num_classes) == (D, DEPTH, M, P, G, H, C)
  assert module.gelu_approximate and module.num_classes == C
  x = _images()
  np.testing.assert_allclose(module.apply(variables, x),
                             _ref_google(a, x, layout, prefix, scanned),
                             rtol=1e-4, atol=1e-4)


def test_timm_safetensors_give_the_checkpoints_forward_pass(tmp_path):
  a = _timm()
  module, variables, info = vc.load_vit(_save_st(tmp_path, a), num_prompts=0,
                                        num_heads=H)
  assert info.layout == "timm" and info.num_heads is None
  assert not module.gelu_approximate and module.num_heads == H
  x = _images()
  np.testing.assert_allclose(module.apply(variables, x), _ref_timm(a, x),
                             rtol=1e-4, atol=1e-4)
  # Without qkv bias (timm's qkv_bias=False models).
  b = _timm(seed=3, qkv_bias=False)
  module, variables, _ = vc.load_vit(_save_st(tmp_path, b, "nb.safetensors"),
                                     num_prompts=0, num_heads=H)
  np.testing.assert_allclose(module.apply(variables, x), _ref_timm(b, x),
                             rtol=1e-4, atol=1e-4)


def test_timm_default_heads_are_head_size_64(tmp_path):
  # D = 32 is not a multiple of 64: the head count must be given.
  with pytest.raises(vc.CheckpointError, match="pass num_heads"):
    vc.load_vit(_save_st(tmp_path, _timm()), num_prompts=0)


def test_bf16_safetensors_load_as_float32(tmp_path):
  a = _timm()
  half = {k: v.astype(ml_dtypes.bfloat16) for k, v in a.items()}
  got = vc.read_safetensors(_save_st(tmp_path, half))
  for k in a:
    assert got[k].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got[k], half[k])
  module, variables, _ = vc.load_vit(tmp_path / "model.safetensors",
                                     num_prompts=0, num_heads=H)
  assert variables["params"]["block0"]["attn"]["query"]["kernel"].dtype == np.float32
  want = {k: v.astype(np.float32) for k, v in half.items()}
  np.testing.assert_allclose(module.apply(variables, _images()),
                             _ref_timm(want, _images()), rtol=1e-4, atol=1e-4)


def test_prompts_are_fresh_and_the_backbone_is_unchanged(tmp_path):
  path = _save_npz(tmp_path, _google("vt"))
  _, plain, _ = vc.load_vit(path, num_prompts=0)
  module, v, _ = vc.load_vit(path, num_prompts=3, seed=4)
  p = v["params"]
  for i in range(DEPTH):
    pk = p[f"block{i}"]["attn"]["prompt_k"]
    assert pk.shape == (3, D) and 0.005 < float(np.std(pk)) < 0.05  # N(0, 0.02²)
    for name in ("query", "out"):
      np.testing.assert_array_equal(p[f"block{i}"]["attn"][name]["kernel"],
                                    plain["params"][f"block{i}"]["attn"][name]["kernel"])
  # Prompts take part in the forward pass.
  assert not np.allclose(module.apply(v, _images()),
                         module.clone(num_prompts=0).apply(plain, _images()))


def test_a_head_of_another_width_or_behind_pre_logits_is_fresh(tmp_path):
  a = _google("vt", pre_logits=True)
  _, v, info = vc.load_vit(_save_npz(tmp_path, a), num_prompts=0)
  assert info.num_classes is None and v["params"]["head"]["kernel"].shape == (D, 10)
  _, v, info = vc.load_vit(_save_npz(tmp_path, _google("vt"), "b.npz"),
                           num_classes=7, num_prompts=0)
  assert info.num_classes is None and v["params"]["head"]["kernel"].shape == (D, 7)
  assert not np.allclose(v["params"]["head"]["kernel"][:, :C], a["head/kernel"])


# ----------------------------------------------------------------- resolution

def _bilinear(grid_in, grid_out):
  """Half-pixel bilinear interpolation matrix, written out per output pixel."""
  m = np.zeros((grid_out, grid_in))
  for i in range(grid_out):
    s = min(max((i + 0.5) * grid_in / grid_out - 0.5, 0.0), grid_in - 1.0)
    lo = int(math.floor(s))
    hi = min(lo + 1, grid_in - 1)
    m[i, lo] += 1 - (s - lo)
    m[i, hi] += s - lo
  return m


@pytest.mark.parametrize("grid", [2, 3, 4, 6])
def test_position_embedding_is_resampled_to_the_model_grid(grid):
  pos = _timm()["pos_embed"]
  got = vc.resample_pos_embed(pos, grid)
  assert got.shape == (1, grid * grid + 1, D) and got.dtype == pos.dtype
  np.testing.assert_array_equal(got[0, 0], pos[0, 0])  # class token
  src = pos[0, 1:].reshape(G, G, D).astype(np.float64)
  w = _bilinear(G, grid)
  want = np.einsum("ai,bj,ijd->abd", w, w, src).reshape(-1, D)
  np.testing.assert_allclose(got[0, 1:], want, rtol=1e-5, atol=1e-6)
  # The same as jax.image.resize's bilinear without antialiasing.
  ref = jax.image.resize(src, (grid, grid, D), "linear", antialias=False)
  np.testing.assert_allclose(got[0, 1:], np.asarray(ref).reshape(-1, D),
                             rtol=1e-5, atol=1e-6)


def test_a_model_at_another_resolution_gets_the_resampled_embedding(tmp_path):
  a = _timm()
  module, v, _ = vc.load_vit(_save_st(tmp_path, a), num_prompts=0, num_heads=H,
                             image_size=6 * P)
  np.testing.assert_array_equal(v["params"]["pos_embed"],
                                vc.resample_pos_embed(a["pos_embed"], 6))
  assert module.image_size == 24
  assert module.apply(v, _images(side=6 * P)).shape == (3, C)


def test_big_vision_class_token_gets_no_position(tmp_path):
  a = _google("bv")
  _, v, _ = vc.load_vit(_save_npz(tmp_path, a), num_prompts=0, image_size=8)
  np.testing.assert_array_equal(v["params"]["pos_embed"][0, 0], 0.0)


# ----------------------------------------------------------------- the zoo

def test_zoo_refuses_a_checkpoint_of_another_architecture(tmp_path):
  # Checked from the shapes, before any model is built.
  path = _save_st(tmp_path, _timm())
  with pytest.raises(vc.CheckpointError, match=r"width=32.*width=192"):
    zoo.load_backbone("vit_tiny_4", path)
  with pytest.raises(vc.CheckpointError, match=r"width=32.*width=384"):
    zoo.load_backbone("vit_small_16", _save_npz(tmp_path, _google("bv")))


# Builds, loads and runs a 5.5M-parameter ViT-Tiny (~18 s on 2 cores); the
# layout mapping itself is tested on the small checkpoints above.
@pytest.mark.slow
def test_zoo_loads_a_full_size_checkpoint_and_refuses_another_model(tmp_path):
  # vit_tiny_4: width 192, 12 blocks, 3 heads, MLP 768, patch 4, 32 px.
  r = _rng(5)
  n = lambda *s: (0.02 * r.normal(size=s)).astype(np.float32)
  d, m = 192, 768
  a = {"cls_token": n(1, 1, d), "pos_embed": n(1, 65, d),
       "patch_embed.proj.weight": n(d, 3, 4, 4), "patch_embed.proj.bias": n(d),
       "norm.weight": 1 + n(d), "norm.bias": n(d)}
  for i in range(12):
    b = f"blocks.{i}."
    a.update({b + "norm1.weight": 1 + n(d), b + "norm1.bias": n(d),
              b + "norm2.weight": 1 + n(d), b + "norm2.bias": n(d),
              b + "attn.qkv.weight": n(3 * d, d), b + "attn.qkv.bias": n(3 * d),
              b + "attn.proj.weight": n(d, d), b + "attn.proj.bias": n(d),
              b + "mlp.fc1.weight": n(m, d), b + "mlp.fc1.bias": n(m),
              b + "mlp.fc2.weight": n(d, m), b + "mlp.fc2.bias": n(d)})
  path = _save_st(tmp_path, a)
  module, variables, pretrained = zoo.load_backbone("vit_tiny_4", path,
                                                    num_prompts=2)
  assert pretrained and module.num_heads == 3 and module.num_prompts == 2
  q = variables["params"]["block11"]["attn"]["value"]["kernel"]
  np.testing.assert_array_equal(q, a["blocks.11.attn.qkv.weight"][2 * d:].T)
  prepared = zoo.peft_model("vit_tiny_4", module, variables, num_classes=4)
  assert prepared.apply_fn(prepared.init_params,
                           np.zeros((2, 32, 32, 3), np.float32)).shape == (2, 4)
  with pytest.raises(vc.CheckpointError, match=r"width=192.*width=384"):
    zoo.load_backbone("vit_small_4", path)


# ----------------------------------------------------------------- bad files

def test_unknown_layouts_and_unsupported_variants_are_named(tmp_path):
  with pytest.raises(vc.CheckpointError, match="unknown checkpoint layout"):
    vc.load_vit(_save_npz(tmp_path, {"conv1.weight": np.zeros(3)}))
  a = _google("bv")
  del a["params/cls"]
  with pytest.raises(vc.CheckpointError, match="class token"):
    vc.load_vit(_save_npz(tmp_path, a, "gap.npz"))
  t = _timm()
  t["fc_norm.weight"] = np.ones(D, np.float32)
  with pytest.raises(vc.CheckpointError, match="global-average"):
    vc.load_vit(_save_st(tmp_path, t, "gap.safetensors"), num_heads=H)
  with pytest.raises(vc.CheckpointError, match="unknown checkpoint format"):
    p = tmp_path / "w.pt"
    p.write_bytes(b"\x80\x04")
    vc.load_vit(p)
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    vc.load_vit(tmp_path / "missing.npz")


def test_shape_mismatches_are_errors(tmp_path):
  path = _save_npz(tmp_path, _google("vt"))
  with pytest.raises(vc.CheckpointError, match="num_heads=4.*2 heads"):
    vc.load_vit(path, num_heads=4)
  with pytest.raises(vc.CheckpointError, match="depth=2.*depth=12"):
    vc.load_vit(path, expect={"depth": 12})
  with pytest.raises(vc.CheckpointError, match="multiple of the checkpoint's patch"):
    vc.load_vit(path, image_size=18)
  a = _google("vt")
  a["Transformer/encoderblock_1/MlpBlock_3/Dense_1/kernel"] = np.zeros((M + 1, D),
                                                                      np.float32)
  with pytest.raises(vc.CheckpointError, match=r"block1/mlp/fc2/kernel has shape"):
    vc.load_vit(_save_npz(tmp_path, a, "bad.npz"))


def test_pickle_is_never_loaded_and_broken_files_are_refused(tmp_path):
  path = tmp_path / "obj.npz"
  np.savez(path, **{"embedding/kernel": np.array([{"a": 1}], dtype=object)})
  with pytest.raises(vc.CheckpointError, match="pickle"):
    vc.load_vit(path)
  good = _save_st(tmp_path, _timm())
  raw = good.read_bytes()
  cut = tmp_path / "cut.safetensors"
  cut.write_bytes(raw[:len(raw) - 100])
  with pytest.raises(vc.CheckpointError, match="truncated"):
    vc.read_safetensors(cut)
  junk = tmp_path / "junk.safetensors"
  junk.write_bytes(b"\xff" * 64)
  with pytest.raises(vc.CheckpointError, match="header length"):
    vc.read_safetensors(junk)
