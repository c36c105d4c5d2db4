"""LoRA, the paper's parameter-efficient baseline: W + scale * A @ B on every parameter whose role
(esft_jax/param_roles.py) is a LoRA target: every linear map except the embedding, the output head and the routers
(which are not linear modules in transformers either), with routed experts adapted per expert (A [E, in, r],
B [E, r, out]).

A starts uniform in ±1/sqrt(in) and B at zero (PEFT's initialisation), so training starts from the base model.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from esft_jax.param_roles import role
from esft_jax.paths import leaves_by_path


def init_lora(params, rank: int, rng: jax.Array, dtype=jnp.float32) -> dict:
  factors: dict = {}
  targets = [(p, leaf) for p, leaf in leaves_by_path(params).items() if role(p).lora_target]
  for (path, kernel), key in zip(targets, jax.random.split(rng, max(len(targets), 1))):
    *lead, fan_in, fan_out = kernel.shape
    bound = 1.0 / math.sqrt(fan_in)
    node = factors
    for part in path.split("/"):
      node = node.setdefault(part, {})
    node["lora_a"] = jax.random.uniform(key, (*lead, fan_in, rank), dtype, -bound, bound)
    node["lora_b"] = jnp.zeros((*lead, rank, fan_out), dtype)
  return factors


def apply_lora(params, factors, scale: float) -> dict:
  """Params with every adapted kernel replaced by kernel + scale * A @ B (in the kernel's dtype)."""

  def merge(base, adapter):
    if isinstance(adapter, dict) and "lora_a" in adapter:
      delta = jnp.matmul(adapter["lora_a"], adapter["lora_b"]) * scale
      return (base.astype(jnp.float32) + delta).astype(base.dtype)
    return {k: merge(v, adapter[k]) if k in adapter else v for k, v in base.items()}

  return merge(params, factors)
