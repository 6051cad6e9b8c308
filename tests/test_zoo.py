import jax
import numpy as np
import pytest

from fastntk_jax.io import checkpoint

from fastntk_jax.models import zoo


def test_registry_names_and_errors():
  assert {"resnet20", "resnet110", "mobilenetv2", "vit_tiny_4",
          "vit_base_16"} <= set(zoo.MODEL_NAMES)
  assert zoo.spec("vit_small_16").image_size == 224
  assert zoo.spec("mobilenetv2").peft == "batchnorm"
  with pytest.raises(ValueError, match="unknown model 'vgg'.*resnet20"):
    zoo.spec("vgg")
  with pytest.raises(ValueError, match="mode"):
    zoo.peft_predicate("resnet20", {}, mode="bn")


def test_resnet110_counts_closed_form():
  total, num_peft = zoo.param_counts("resnet110")
  n = 18  # blocks per stage
  bn = 2 * (16 + 2 * n * (16 + 32 + 64))
  head = 64 * 10 + 10
  convs = 27 * 16 + 2 * n * 9 * 16 * 16 + (9 * 16 * 32 + (2 * n - 1) * 9 * 32 * 32) + (
      9 * 32 * 64 + (2 * n - 1) * 9 * 64 * 64)
  assert num_peft == bn + head
  assert total == convs + bn + head


# ViT pretrain + prepare through checkpoints (~30 s); the prompt layout is
# tested in test_vit.py.
@pytest.mark.slow
def test_vit_backbone_checkpoint_gains_new_prompts(tmp_path):
  plain = zoo.build("vit_tiny_4", num_prompts=0)
  v = zoo.init_variables(plain, 32, seed=1)
  assert not any("prompt" in "/".join(map(str, p)) for p, _ in
                 jax.tree_util.tree_flatten_with_path(v)[0])
  checkpoint.save(tmp_path / "b.ckpt", {"variables": v, "opt_state": {}},
                  config={"model": "vit_tiny_4", "num_classes": 10},
                  kind="backbone")
  module, loaded, pretrained = zoo.load_backbone(
      "vit_tiny_4", tmp_path / "b.ckpt", num_prompts=5, seed=2)
  assert pretrained and module.num_prompts == 5
  np.testing.assert_array_equal(loaded["params"]["block0"]["attn"]["query"]["kernel"],
                                v["params"]["block0"]["attn"]["query"]["kernel"])
  assert loaded["params"]["block11"]["attn"]["prompt_k"].shape == (5, 192)
  prep = zoo.peft_model("vit_tiny_4", module, loaded, num_classes=3, seed=0)
  sel = jax.tree_util.tree_flatten_with_path(prep.init_params)[0]
  names = ["/".join(k.key for k in p) for p, _ in sel]
  assert len(names) == 2 * 12 + 2 and all("prompt" in n or "head" in n for n in names)
  assert prep.num_peft == 12 * 2 * 5 * 192 + 192 * 3 + 3
  x = np.zeros((2, 32, 32, 3), np.float32)
  assert prep.apply_fn(prep.init_params, x).shape == (2, 3)
  # A checkpoint of another model is refused with the model it holds.
  with pytest.raises(ValueError, match="'vit_tiny_4' backbone, not 'vit_small_4'"):
    zoo.load_backbone("vit_small_4", tmp_path / "b.ckpt")


def test_prepare_new_head_and_all_mode():
  module, v, pretrained = zoo.load_backbone("resnet20")
  assert pretrained
  p = zoo.peft_model("resnet20", module, v, num_classes=4, seed=0)
  w = p.init_params["params"]["head"]
  assert w["kernel"].shape == (64, 4) and not np.any(w["bias"])
  assert p.num_peft == 2 * (16 + 6 * 16 + 6 * 32 + 6 * 64) + 64 * 4 + 4
  a = zoo.peft_model("resnet20", module, v, num_classes=4, mode="all")
  assert a.num_peft == a.num_total
  assert "batch_stats" in a.frozen and "params" not in a.frozen
