"""Pretrained ViT weights in the public layouts, loaded into :class:`ViT`.

Three layouts are read, each as its own code defines the model:

``vision_transformer``
  google-research/vision_transformer ``.npz`` (ViT-B/16 and friends): keys
  ``embedding/kernel``, ``cls``, ``Transformer/posembed_input/pos_embedding``
  (with the class token's row), ``Transformer/encoderblock_{i}/`` with
  ``LayerNorm_0``, ``MultiHeadDotProductAttention_1``, ``LayerNorm_2``,
  ``MlpBlock_3/Dense_{0,1}``, then ``Transformer/encoder_norm`` and ``head``;
  optionally under ``opt/target/``. Tanh-approximate GELU.
``big_vision``
  google-research/big_vision ``.npz`` with ``pool_type="tok"``: keys under
  ``params/`` (or ``params/img/``), ``pos_embedding`` *without* a class-token
  row (big_vision adds the position embedding before it prepends the class
  token, which is our model with a zero row for the class token),
  ``encoderblock_{i}/`` with ``LayerNorm_0``, ``MultiHeadDotProductAttention_0``,
  ``LayerNorm_1``, ``MlpBlock_0``; also the scanned form, one
  ``Transformer/encoderblock/`` whose arrays have a leading depth axis.
  Tanh-approximate GELU.
``timm``
  huggingface/pytorch-image-models ``.safetensors`` (``vit_*_patch*``): PyTorch
  conventions (``Linear`` weights ``(out, in)``, the patch convolution
  ``(D, 3, p, p)``), a fused ``attn.qkv`` that is split into query, key and
  value here. Exact GELU.

Attention kernels ``(D, H, d)`` (Google) and the fused ``(3D, D)`` (timm) map
onto our ``(D, D)`` projections with heads in the same order (column
``h·d + j``), so the forward pass is the checkpoint's own. Prompts are never in a
checkpoint: they come freshly initialised. The head is loaded only when its
width is the requested number of classes (and, for vision_transformer, when no
``pre_logits`` layer sits in front of it); otherwise it is a fresh head, which
:func:`fastntk_jax.models.zoo.prepare` replaces for the downstream task anyway.

When the model's image size gives another patch grid than the checkpoint's,
the position embedding's grid is resampled bilinearly (half-pixel centres, no
antialiasing; the class-token row is kept), as both reference codes do when
fine-tuning at another resolution.

No pickle is ever loaded: ``.npz`` files are opened with
``allow_pickle=False`` and ``.safetensors`` files are parsed here (an 8-byte
header length, a JSON header, raw little-endian buffers), without torch.

Example::

  module, variables, info = load_vit("ViT-B_16.npz", num_classes=10,
                                     num_prompts=5, image_size=224)
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import jax
import ml_dtypes
import numpy as np

from fastntk_jax.models.vit import ViT

__all__ = [
  "LAYOUTS",
  "CheckpointError",
  "CheckpointInfo",
  "inspect_checkpoint",
  "load_vit",
  "read_checkpoint",
  "read_safetensors",
  "resample_pos_embed",
  "vit_params_from_checkpoint",
]

LAYOUTS = ("vision_transformer", "big_vision", "timm")

_ST_DTYPES = {
  "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
  "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"),
  "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
  "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_MAX_HEADER = 100 * 2**20  # a safetensors header is JSON; 100 MiB is absurd
# Features of a timm ViT that the zoo's ViT does not have.
_TIMM_UNSUPPORTED = {
  "fc_norm.weight": "global-average pooling (fc_norm)",
  "reg_token": "register tokens",
  "attn_pool.latent": "attention pooling",
  "blocks.0.ls1.gamma": "LayerScale",
  "blocks.0.attn.q_norm.weight": "query/key normalisation",
  "patch_embed.norm.weight": "a normalised patch embedding",
  "norm_pre.weight": "a pre-transformer LayerNorm",
}


class CheckpointError(ValueError):
  """A checkpoint that cannot be loaded into the zoo's ViT (the message says why)."""


class CheckpointInfo(NamedTuple):
  """What a checkpoint holds, read from its array shapes.

  Attributes:
    layout: one of :data:`LAYOUTS`.
    prefix: the key prefix the arrays sit under (``""``, ``"opt/target/"``,
      ``"params/"`` ...).
    width, depth, mlp_dim, patch_size: the architecture.
    grid: side of the checkpoint's patch grid (its image size / patch size).
    num_heads: from the attention kernels (Google layouts); None for timm,
      whose fused projection does not record it.
    num_classes: width of the checkpoint's head, None without a usable head.
    gelu_approximate: the GELU the checkpoint was trained with.
  """

  layout: str
  prefix: str
  width: int
  depth: int
  mlp_dim: int
  patch_size: int
  grid: int
  num_heads: int | None
  num_classes: int | None
  gelu_approximate: bool


# ----------------------------------------------------------------- file formats

def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
  """Every tensor of a ``.safetensors`` file as a NumPy array (no torch).

  Raises:
    CheckpointError: a truncated or malformed file, or an unknown dtype.
  """
  path = Path(path)
  size = path.stat().st_size
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) != 8:
      raise CheckpointError(f"{path}: too short for a safetensors file.")
    (n,) = struct.unpack("<Q", head)
    if n > min(_MAX_HEADER, size - 8):
      raise CheckpointError(
          f"{path}: header length {n} does not fit the file ({size} bytes); "
          "is it a safetensors file?")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise CheckpointError(f"{path}: the safetensors header is not JSON "
                            f"({e}).") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{path}: the safetensors header is not a mapping.")
  buf = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
  out = {}
  for name, meta in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype = _ST_DTYPES[meta["dtype"]]
      shape = tuple(int(s) for s in meta["shape"])
      start, end = (int(o) for o in meta["data_offsets"])
    except (KeyError, TypeError, ValueError):
      raise CheckpointError(
          f"{path}: tensor {name!r} has an unreadable entry {meta!r} (dtype "
          f"must be one of {sorted(_ST_DTYPES)}).") from None
    count = math.prod(shape)
    if not 0 <= start <= end <= buf.size or end - start != count * dtype.itemsize:
      raise CheckpointError(
          f"{path}: tensor {name!r} claims bytes {start}..{end} for {count} "
          f"{meta['dtype']} values; the file is truncated or corrupt.")
    out[name] = np.frombuffer(buf, dtype, count, start).reshape(shape)
  return out


def read_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
  """The arrays of a ``.npz`` (no pickle) or ``.safetensors`` file, by suffix."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no checkpoint at {path}.")
  if path.suffix == ".safetensors":
    return read_safetensors(path)
  if path.suffix == ".npz":
    try:
      with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
    except ValueError as e:
      if "pickle" in str(e).lower():
        raise CheckpointError(
            f"{path} holds Python objects (pickle), which are never loaded; "
            "save plain arrays with np.savez.") from None
      raise
  raise CheckpointError(
      f"{path}: unknown checkpoint format {path.suffix!r}; pass a "
      "vision_transformer/big_vision .npz or a timm .safetensors file.")


# ----------------------------------------------------------------- layouts

def _google_prefix(arrays: Mapping[str, Any]) -> tuple[str, str] | None:
  for prefix, layout in (("", "vision_transformer"),
                         ("opt/target/", "vision_transformer"),
                         ("params/", "big_vision"),
                         ("params/img/", "big_vision"),
                         ("img/", "big_vision")):
    if prefix + "embedding/kernel" in arrays:
      if (layout == "vision_transformer"
          and prefix + "Transformer/posembed_input/pos_embedding" not in arrays
          and prefix + "pos_embedding" in arrays):
        layout = "big_vision"  # an un-prefixed big_vision export
      return layout, prefix
  return None


def _block_arrays(arrays, prefix, depth_scanned):
  """``name -> array`` for block ``i`` (unscanned or scanned keys)."""
  def get(i, rest):
    if depth_scanned:
      return arrays[f"{prefix}Transformer/encoderblock/{rest}"][i]
    return arrays[f"{prefix}Transformer/encoderblock_{i}/{rest}"]
  return get


def _need(arrays, key, layout):
  if key not in arrays:
    raise CheckpointError(
        f"{layout} checkpoint has no {key!r}; it is not a ViT of the "
        "supported form (class-token pooling, learned position embedding).")
  return arrays[key]


def inspect_checkpoint(arrays: Mapping[str, Any]) -> CheckpointInfo:
  """The layout and architecture of a checkpoint's arrays.

  Raises:
    CheckpointError: an unknown layout, or a ViT variant the zoo's ViT does not
      implement (global-average or attention pooling, register tokens, ...).
  """
  google = _google_prefix(arrays)
  if google is not None:
    layout, prefix = google
    kernel = np.shape(arrays[prefix + "embedding/kernel"])
    if len(kernel) != 4 or kernel[0] != kernel[1] or kernel[2] != 3:
      raise CheckpointError(
          f"{layout} embedding/kernel has shape {kernel}; expected (p, p, 3, D) "
          "(a hybrid ResNet-ViT stem is not supported).")
    p, width = kernel[0], kernel[3]
    if prefix + "cls" not in arrays:
      raise CheckpointError(
          f"{layout} checkpoint has no class token ({prefix}cls): it pools "
          "by global averaging or a MAP head, which the zoo's ViT does not "
          "implement; use a checkpoint with pool_type='tok'.")
    scanned = prefix + "Transformer/encoderblock/LayerNorm_0/scale" in arrays
    if scanned:
      depth = np.shape(arrays[prefix + "Transformer/encoderblock/LayerNorm_0/scale"])[0]
    else:
      depth = 0
      while f"{prefix}Transformer/encoderblock_{depth}/LayerNorm_0/scale" in arrays:
        depth += 1
    if depth == 0:
      raise CheckpointError(f"{layout} checkpoint has no encoder blocks under "
                            f"{prefix}Transformer/.")
    mha, mlp = ((1, 3) if layout == "vision_transformer" else (0, 0))
    get = _block_arrays(arrays, prefix, scanned)
    try:
      q = np.shape(get(0, f"MultiHeadDotProductAttention_{mha}/query/kernel"))
      fc1 = np.shape(get(0, f"MlpBlock_{mlp}/Dense_0/kernel"))
    except KeyError as e:
      raise CheckpointError(f"{layout} checkpoint lacks {e.args[0]!r}.") from None
    if layout == "vision_transformer":
      pos = _need(arrays, prefix + "Transformer/posembed_input/pos_embedding",
                  layout)
      tokens = np.shape(pos)[1] - 1
    else:
      tokens = np.shape(_need(arrays, prefix + "pos_embedding", layout))[1]
    head = arrays.get(prefix + "head/kernel")
    usable = (head is not None and prefix + "pre_logits/kernel" not in arrays
              and np.shape(head)[0] == width)
    return CheckpointInfo(layout, prefix, int(width), int(depth), int(fc1[1]),
                          int(p), _grid(tokens, layout), int(q[1]),
                          int(np.shape(head)[1]) if usable else None, True)
  if "blocks.0.attn.qkv.weight" in arrays:
    for key, what in _TIMM_UNSUPPORTED.items():
      if key in arrays:
        raise CheckpointError(
            f"timm checkpoint has {key!r}: this ViT uses {what}, which the "
            "zoo's ViT does not implement.")
    proj = np.shape(_need(arrays, "patch_embed.proj.weight", "timm"))
    if len(proj) != 4 or proj[1] != 3 or proj[2] != proj[3]:
      raise CheckpointError(f"timm patch_embed.proj.weight has shape {proj}; "
                            "expected (D, 3, p, p).")
    _need(arrays, "cls_token", "timm")
    depth = 0
    while f"blocks.{depth}.attn.qkv.weight" in arrays:
      depth += 1
    tokens = np.shape(_need(arrays, "pos_embed", "timm"))[1] - 1
    head = arrays.get("head.weight")
    usable = head is not None and np.ndim(head) == 2 and np.shape(head)[1] == proj[0]
    return CheckpointInfo(
        "timm", "", int(proj[0]), depth,
        int(np.shape(_need(arrays, "blocks.0.mlp.fc1.weight", "timm"))[0]),
        int(proj[2]), _grid(tokens, "timm"), None,
        int(np.shape(head)[0]) if usable else None, False)
  some = ", ".join(sorted(arrays)[:6])
  raise CheckpointError(
      f"unknown checkpoint layout (first keys: {some}); supported are "
      "google-research/vision_transformer and big_vision .npz (a key "
      "'embedding/kernel', possibly under 'params/') and timm .safetensors "
      "(keys 'blocks.{i}.attn.qkv.weight').")


def _grid(tokens: int, layout: str) -> int:
  g = math.isqrt(tokens)
  if g * g != tokens:
    raise CheckpointError(f"{layout} position embedding has {tokens} patch "
                          "positions, not a square grid.")
  return g


def resample_pos_embed(pos: np.ndarray, grid: int) -> np.ndarray:
  """``(1, 1 + g², D)`` position embedding on a ``grid × grid`` patch grid.

  The class-token row is kept; the ``g × g`` grid is resampled bilinearly with
  half-pixel centres (source coordinate ``(i + ½)·g/grid − ½``, clamped to the
  edge) and no antialiasing.
  """
  pos = np.asarray(pos)
  g = _grid(pos.shape[1] - 1, "the")
  if g == grid:
    return pos
  emb = pos[0, 1:].reshape(g, g, -1).astype(np.float64)

  def weights(n_in, n_out):
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), lo), 1 - (src - lo))
    np.add.at(m, (np.arange(n_out), hi), src - lo)
    return m

  w = weights(g, grid)
  out = np.einsum("ai,bj,ijd->abd", w, w, emb).reshape(1, grid * grid, -1)
  return np.concatenate([pos[:, :1], out.astype(pos.dtype)], axis=1)


def _f32(a) -> np.ndarray:
  return np.asarray(a, dtype=np.float32)


def vit_params_from_checkpoint(arrays: Mapping[str, Any], info: CheckpointInfo,
                               grid: int) -> dict:
  """The checkpoint's arrays as the zoo ViT's ``params`` tree (no prompts).

  The head is included only when ``info.num_classes`` is set. ``grid`` is the
  model's patch grid; the position embedding is resampled to it.
  """
  d = info.width
  if info.layout == "timm":
    return _timm_params(arrays, info, grid)
  pre = info.prefix
  vt = info.layout == "vision_transformer"
  mha, ln2, mlp = (1, 2, 3) if vt else (0, 1, 0)
  scanned = pre + "Transformer/encoderblock/LayerNorm_0/scale" in arrays
  get = _block_arrays(arrays, pre, scanned)
  if vt:
    pos = _f32(arrays[pre + "Transformer/posembed_input/pos_embedding"])
  else:  # no class-token row: big_vision adds it before prepending the token
    pos = _f32(arrays[pre + "pos_embedding"])
    pos = np.concatenate([np.zeros((1, 1, d), np.float32), pos], axis=1)
  params = {
    "patch_embed": {"kernel": _f32(arrays[pre + "embedding/kernel"]),
                    "bias": _f32(arrays[pre + "embedding/bias"])},
    "cls": _f32(arrays[pre + "cls"]).reshape(1, 1, d),
    "pos_embed": resample_pos_embed(pos, grid),
    "final_ln": {"scale": _f32(arrays[pre + "Transformer/encoder_norm/scale"]),
                 "bias": _f32(arrays[pre + "Transformer/encoder_norm/bias"])},
  }
  for i in range(info.depth):
    att = f"MultiHeadDotProductAttention_{mha}"
    block = {
      "ln1": {"scale": _f32(get(i, "LayerNorm_0/scale")),
              "bias": _f32(get(i, "LayerNorm_0/bias"))},
      "ln2": {"scale": _f32(get(i, f"LayerNorm_{ln2}/scale")),
              "bias": _f32(get(i, f"LayerNorm_{ln2}/bias"))},
      "attn": {},
      "mlp": {f"fc{j + 1}": {
          "kernel": _f32(get(i, f"MlpBlock_{mlp}/Dense_{j}/kernel")),
          "bias": _f32(get(i, f"MlpBlock_{mlp}/Dense_{j}/bias"))}
          for j in range(2)},
    }
    for name in ("query", "key", "value"):  # (D, H, d) -> (D, H·d)
      block["attn"][name] = {
          "kernel": _f32(get(i, f"{att}/{name}/kernel")).reshape(d, d),
          "bias": _f32(get(i, f"{att}/{name}/bias")).reshape(d)}
    block["attn"]["out"] = {  # (H, d, D) -> (H·d, D)
        "kernel": _f32(get(i, f"{att}/out/kernel")).reshape(d, d),
        "bias": _f32(get(i, f"{att}/out/bias"))}
    params[f"block{i}"] = block
  if info.num_classes is not None:
    params["head"] = {"kernel": _f32(arrays[pre + "head/kernel"]),
                      "bias": _f32(arrays[pre + "head/bias"])}
  return params


def _timm_params(arrays, info, grid):
  d = info.width
  t = lambda key: _f32(arrays[key]).T  # torch Linear (out, in) -> (in, out)
  params = {
    # torch conv (D, 3, p, p) -> Flax (p, p, 3, D)
    "patch_embed": {"kernel": _f32(arrays["patch_embed.proj.weight"]).transpose(2, 3, 1, 0),
                    "bias": _f32(arrays["patch_embed.proj.bias"])},
    "cls": _f32(arrays["cls_token"]).reshape(1, 1, d),
    "pos_embed": resample_pos_embed(_f32(arrays["pos_embed"]), grid),
    "final_ln": {"scale": _f32(arrays["norm.weight"]),
                 "bias": _f32(arrays["norm.bias"])},
  }
  for i in range(info.depth):
    b = f"blocks.{i}."
    qkv_w = _f32(arrays[b + "attn.qkv.weight"])  # (3D, D): rows q, k, v
    qkv_b = (_f32(arrays[b + "attn.qkv.bias"]) if b + "attn.qkv.bias" in arrays
             else np.zeros(3 * d, np.float32))
    attn = {name: {"kernel": qkv_w[k * d:(k + 1) * d].T,
                   "bias": qkv_b[k * d:(k + 1) * d]}
            for k, name in enumerate(("query", "key", "value"))}
    attn["out"] = {"kernel": t(b + "attn.proj.weight"),
                   "bias": _f32(arrays[b + "attn.proj.bias"])}
    params[f"block{i}"] = {
      "ln1": {"scale": _f32(arrays[b + "norm1.weight"]),
              "bias": _f32(arrays[b + "norm1.bias"])},
      "ln2": {"scale": _f32(arrays[b + "norm2.weight"]),
              "bias": _f32(arrays[b + "norm2.bias"])},
      "attn": attn,
      "mlp": {f"fc{j}": {"kernel": t(f"{b}mlp.fc{j}.weight"),
                         "bias": _f32(arrays[f"{b}mlp.fc{j}.bias"])}
              for j in (1, 2)},
    }
  if info.num_classes is not None:
    params["head"] = {"kernel": t("head.weight"),
                      "bias": _f32(arrays["head.bias"])}
  return params


# ----------------------------------------------------------------- the model

def _num_heads(path, info: CheckpointInfo, num_heads: int | None) -> int:
  """The attention heads: the checkpoint's, else ``num_heads``, else
  ``width // 64``; a conflict is an error."""
  heads = info.num_heads
  if num_heads is not None and heads is not None and num_heads != heads:
    raise CheckpointError(
        f"{path}: num_heads={num_heads}, but the checkpoint's attention has "
        f"{heads} heads; leave num_heads=None.")
  if heads is None:
    if num_heads is None and info.width % 64:
      raise CheckpointError(
          f"{path}: width {info.width} is not a multiple of 64; pass num_heads "
          "(timm checkpoints do not record it).")
    heads = num_heads if num_heads is not None else info.width // 64
    if heads < 1 or info.width % heads:
      raise CheckpointError(f"{path}: num_heads={heads} does not divide the "
                            f"width {info.width}.")
  return heads


def load_vit(path: str | Path, *, num_classes: int | None = None,
             num_prompts: int = 5, image_size: int | None = None,
             num_heads: int | None = None, seed: int = 0,
             expect: Mapping[str, int] | None = None
             ) -> tuple[ViT, dict, CheckpointInfo]:
  """A :class:`ViT` and its variables from a checkpoint file.

  Args:
    path: a vision_transformer/big_vision ``.npz`` or a timm ``.safetensors``.
    num_classes: head width; None takes the checkpoint's (10 if it has no
      usable head). A head of another width is freshly initialised.
    num_prompts: ``L_p`` prompts per block, freshly initialised (N(0, 0.02²)).
    image_size: the model's input side; None keeps the checkpoint's. Another
      size resamples the position embedding (it must be a multiple of the
      patch size).
    num_heads: attention heads. Google checkpoints record it (a different
      value is an error); timm's do not, and None then takes ``width // 64``
      (head size 64, that of every released ViT).
    seed: initialisation of the prompts and of a fresh head.
    expect: architecture the caller requires (``width``, ``depth``,
      ``mlp_dim``, ``patch_size``, ``num_heads``): a mismatch is an error that
      names both values.

  Returns:
    ``(module, variables, info)``.

  Raises:
    CheckpointError: unknown layout, unsupported variant, or a mismatch.
  """
  arrays = read_checkpoint(path)
  info = inspect_checkpoint(arrays)
  found = {"width": info.width, "depth": info.depth, "mlp_dim": info.mlp_dim,
           "patch_size": info.patch_size, "num_heads": info.num_heads}
  for key, want in (expect or {}).items():
    if found[key] is not None and found[key] != want:
      raise CheckpointError(
          f"{path}: the checkpoint has {key}={found[key]}, the model expects "
          f"{key}={want} ({found}); pick the model that matches it.")
  heads = _num_heads(path, info, num_heads)
  if image_size is None:
    image_size = info.grid * info.patch_size
  if image_size % info.patch_size:
    raise CheckpointError(
        f"image_size={image_size} is not a multiple of the checkpoint's patch "
        f"size {info.patch_size}.")
  classes = num_classes if num_classes is not None else (info.num_classes or 10)
  module = ViT(num_classes=classes, patch_size=info.patch_size,
               width=info.width, depth=info.depth, num_heads=heads,
               mlp_dim=info.mlp_dim, num_prompts=num_prompts,
               image_size=image_size, gelu_approximate=info.gelu_approximate)
  loaded = vit_params_from_checkpoint(
      arrays, info._replace(num_classes=info.num_classes
                            if info.num_classes == classes else None),
      image_size // info.patch_size)
  fresh = module.init(jax.random.PRNGKey(seed),
                      np.zeros((1, image_size, image_size, 3), np.float32))
  params = jax.tree_util.tree_map(np.asarray, dict(fresh["params"]))
  _overlay(params, loaded, ())
  new = {jax.tree_util.keystr(p) for p, _ in
         jax.tree_util.tree_leaves_with_path(params)}
  got = {jax.tree_util.keystr(p) for p, _ in
         jax.tree_util.tree_leaves_with_path(loaded)}
  missing = sorted(k for k in new - got
                   if "prompt_" not in k and not k.startswith("['head']"))
  if missing:  # a layout mapping that forgot a weight would end up here
    raise CheckpointError(f"{path}: the checkpoint gave no value for "
                          f"{missing[:5]}.")
  if info.num_classes != classes:
    info = info._replace(num_classes=None)
  return module, {"params": params}, info


def _overlay(fresh: dict, loaded: Mapping, path: tuple) -> None:
  """Writes ``loaded``'s leaves into ``fresh`` in place, checking shapes."""
  for k, v in loaded.items():
    if k not in fresh:
      raise CheckpointError(f"checkpoint weight {'/'.join(path + (k,))} has no "
                            "place in the model.")
    if isinstance(v, Mapping):
      fresh[k] = dict(fresh[k])
      _overlay(fresh[k], v, path + (k,))
    else:
      if np.shape(v) != np.shape(fresh[k]):
        raise CheckpointError(
            f"checkpoint weight {'/'.join(path + (k,))} has shape "
            f"{np.shape(v)}, the model expects {np.shape(fresh[k])}.")
      fresh[k] = np.asarray(v, np.float32)
