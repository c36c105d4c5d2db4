"""The optimizer: optax.multi_transform over labels of the trainable tree.

"trainable" leaves get global-norm clipping and AdamW (β 0.9/0.95, decoupled weight decay 0.1 where the
parameter's role says `decayed`: not on norm scales and biases, as transformers' Trainer); "frozen" leaves (the
router bias) get `set_to_zero` and hold no state. Both read esft_jax/param_roles.py.
"""

from __future__ import annotations

import optax

from esft_jax.param_roles import role
from esft_jax.paths import leaves_by_path, set_path

DEFAULT_LR = {"esft": 1e-5, "fft": 3e-5, "lora": 1e-4}  # the paper's learning rates


def learning_rate_schedule(lr: float, steps: int, schedule: str = "constant", warmup: int = 0) -> optax.Schedule:
  if schedule == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]) \
        if warmup else optax.constant_schedule(lr)
  if schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 0), max(steps, warmup + 1), end_value=lr * 0.1)
  raise ValueError(f"learning-rate schedule {schedule!r} is unknown; use constant or cosine")


def _label_tree(trainable, label_fn):
  labels: dict = {}
  for path in leaves_by_path(trainable):
    set_path(labels, path, label_fn(path))
  return labels


def optimizer_labels(trainable) -> dict:
  """'frozen' for leaves that ride along in the trainable tree but must not move (the router's score-correction
  bias, a running statistic); 'trainable' for everything else."""
  return _label_tree(trainable, lambda p: "frozen" if role(p).kind == "router_bias" else "trainable")


def make_optimizer(trainable, schedule: optax.Schedule, weight_decay: float = 0.1, b1: float = 0.9,
                   b2: float = 0.95, max_grad_norm: float = 1.0) -> optax.GradientTransformation:
  decay_mask = _label_tree(trainable, lambda p: role(p).decayed)
  train = optax.chain(
      optax.clip_by_global_norm(max_grad_norm),
      optax.adamw(schedule, b1=b1, b2=b2, eps=1e-8, weight_decay=weight_decay, mask=decay_mask))
  return optax.multi_transform({"trainable": train, "frozen": optax.set_to_zero()}, optimizer_labels(trainable))
