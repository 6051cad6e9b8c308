"""Model zoo: Flax modules and ports of published weights.

Names for the command line and the registry are in :mod:`fastntk_jax.models.zoo`.
"""

from fastntk_jax.models.mobilenetv2 import MobileNetV2
from fastntk_jax.models.resnet import (
    CifarResNet,
    load_resnet_cifar10,
    normalize_cifar,
    resnet_variables_from_torch,
)
from fastntk_jax.models.vit import ViT, normalize_vit, vit_by_name
from fastntk_jax.models.vit_checkpoints import load_vit

__all__ = [
    "CifarResNet",
    "MobileNetV2",
    "ViT",
    "load_resnet_cifar10",
    "load_vit",
    "normalize_cifar",
    "normalize_vit",
    "resnet_variables_from_torch",
    "vit_by_name",
]
