"""Training at the edge: pretraining, PEFT fine-tuning, BatchNorm statistics.

* :mod:`~fastntk_jax.training.train` — ``finetune`` (PEFT parameters, MSE or
  cross-entropy, optional proximal term or tangent mode) and ``pretrain``;
* :mod:`~fastntk_jax.training.bn_stats` — re-estimating BatchNorm statistics.
"""
