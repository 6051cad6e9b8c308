"""Model zoo: Flax modules and ports of published weights."""

from fastntk_jax.models.resnet import (
    CifarResNet,
    load_resnet_cifar10,
    normalize_cifar,
    resnet_variables_from_torch,
)

__all__ = [
    "CifarResNet",
    "load_resnet_cifar10",
    "normalize_cifar",
    "resnet_variables_from_torch",
]
