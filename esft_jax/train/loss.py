"""Next-token cross-entropy with a loss mask (the answer tokens and EOS in ESFT's formatting)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
  """Per-token -log p(target), computed in fp32. [B, L]"""
  logits = logits_BxLxV.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  # A masked sum rather than a gather: its gradient is elementwise, where a gather's would scatter-add into a
  # [B, L, V] buffer (6.7 GB at DeepSeek-V2-Lite's vocabulary and 16k tokens).
  is_target = jnp.arange(logits.shape[-1]) == targets_BxL[..., None]
  target_logit = jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1)
  return log_z - target_logit


def masked_mean_loss(logits_BxLxV: jax.Array, targets_BxL: jax.Array, mask_BxL: jax.Array) -> jax.Array:
  """Mean cross-entropy over the positions where `mask` is set; `targets` are already shifted by one."""
  mask = mask_BxL.astype(jnp.float32)
  return jnp.sum(token_cross_entropy(logits_BxLxV, targets_BxL) * mask) / jnp.maximum(mask.sum(), 1.0)
