"""Next-token cross-entropy with a loss mask (the answer tokens and EOS in ESFT's formatting)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def token_cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
  """Per-token -log p(target), computed in fp32. [B, L]

  Its own gradient, because the logits are the step's largest tensor ([16k tokens, 102400] at DeepSeek-V2-Lite's
  vocabulary: 3.4 GB in bf16): the backward keeps only the logits in their own dtype and the [B, L]
  log-normaliser, and writes (softmax - one_hot) * g in one elementwise pass. (On the CPU, XLA plans one
  logits-sized buffer less than for autodiff of the same formula.)"""
  return _cross_entropy_fwd(logits_BxLxV, targets_BxL)[0]


def _is_target(logits_BxLxV, targets_BxL):
  # A comparison rather than a gather: elementwise over the vocabulary, so it splits like the logits when a mesh
  # shards them.
  return jnp.arange(logits_BxLxV.shape[-1]) == targets_BxL[..., None]


def _cross_entropy_fwd(logits_BxLxV, targets_BxL):
  logits = logits_BxLxV.astype(jnp.float32)
  log_z_BxL = jax.nn.logsumexp(logits, axis=-1)
  target_logit_BxL = jnp.sum(jnp.where(_is_target(logits_BxLxV, targets_BxL), logits, 0.0), axis=-1)
  return log_z_BxL - target_logit_BxL, (logits_BxLxV, targets_BxL, log_z_BxL)


def _cross_entropy_bwd(residuals, g_BxL):
  logits_BxLxV, targets_BxL, log_z_BxL = residuals
  probs = jnp.exp(logits_BxLxV.astype(jnp.float32) - log_z_BxL[..., None])
  grad = (probs - _is_target(logits_BxLxV, targets_BxL)) * g_BxL[..., None]
  return grad.astype(logits_BxLxV.dtype), None


token_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def masked_mean_loss(logits_BxLxV: jax.Array, targets_BxL: jax.Array, mask_BxL: jax.Array) -> jax.Array:
  """Mean cross-entropy over the positions where `mask` is set; `targets` are already shifted by one."""
  mask = mask_BxL.astype(jnp.float32)
  return jnp.sum(token_cross_entropy(logits_BxLxV, targets_BxL) * mask) / jnp.maximum(mask.sum(), 1.0)
