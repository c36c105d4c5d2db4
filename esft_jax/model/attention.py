"""Attention: MHA/GQA (optional q/k norm, QKV clipping) and DeepSeek's multi-head latent attention (MLA).

Module and parameter names follow the Hugging Face module names (q_proj, kv_a_proj_with_mqa, ...) so the
checkpoint name map in interop stays a flat table.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from esft_jax.config import ModelConfig
from esft_jax.model.layers import Linear, RMSNorm, apply_rope

Dtype = jnp.dtype
MASKED = -1e30  # finite, so a fully masked (padding) query row gives a uniform softmax instead of NaN


def attention_mask(segment_ids_BxL: jax.Array, window: int | None) -> jax.Array:
  """[B, 1, 1, L, L] boolean: causal, within the same segment (packed documents never see each other),
  never on padding (segment id 0), and within `window` tokens where the layer uses sliding-window attention."""
  idx = jnp.arange(segment_ids_BxL.shape[1])
  allowed = idx[:, None] >= idx[None, :]
  if window is not None:
    allowed &= idx[None, :] > idx[:, None] - window
  same_segment = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  allowed = allowed[None] & same_segment & (segment_ids_BxL[:, None, :] != 0)
  return allowed[:, None, None]


def dot_product_attention(q_BxQxHxD: jax.Array, k_BxKxGxD: jax.Array, v_BxKxGxV: jax.Array, mask: jax.Array,
                          scale: float) -> jax.Array:
  """Grouped-query attention with an fp32 softmax; H query heads share G = H / group key/value heads."""
  b, q_len, h, d = q_BxQxHxD.shape
  g = k_BxKxGxD.shape[2]
  q = q_BxQxHxD.reshape(b, q_len, g, h // g, d)
  scores = jnp.einsum("bqgrd,bkgd->bgrqk", q, k_BxKxGxD).astype(jnp.float32) * scale
  probs = jax.nn.softmax(jnp.where(mask, scores, MASKED), axis=-1).astype(v_BxKxGxV.dtype)
  out = jnp.einsum("bgrqk,bkgv->bqgrv", probs, v_BxKxGxV)
  return out.reshape(b, q_len, h, v_BxKxGxV.shape[-1])


class GroupedQueryAttention(nn.Module):
  config: ModelConfig
  layer: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids_BxL: jax.Array) -> jax.Array:
    cfg = self.config
    b, length, _ = x_BxLxD.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q = Linear(cfg.num_heads * cfg.head_dim, ("embed", "heads"), cfg.qkv_bias, name="q_proj", **kw)(x_BxLxD)
    k = Linear(cfg.num_kv_heads * cfg.head_dim, ("embed", "kv_heads"), cfg.qkv_bias, name="k_proj", **kw)(x_BxLxD)
    v = Linear(cfg.num_kv_heads * cfg.head_dim, ("embed", "kv_heads"), cfg.qkv_bias, name="v_proj", **kw)(x_BxLxD)
    if cfg.qk_norm == "full":  # OLMoE normalises the whole projection, before splitting heads
      q = RMSNorm(cfg.rms_norm_eps, "heads", self.param_dtype, name="q_norm")(q)
      k = RMSNorm(cfg.rms_norm_eps, "kv_heads", self.param_dtype, name="k_norm")(k)
    if cfg.clip_qkv is not None:
      q, k, v = (jnp.clip(t, -cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
    q = q.reshape(b, length, cfg.num_heads, cfg.head_dim)
    k = k.reshape(b, length, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(b, length, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm == "head":  # Qwen3 normalises each head
      q = RMSNorm(cfg.rms_norm_eps, "head_dim", self.param_dtype, name="q_norm")(q)
      k = RMSNorm(cfg.rms_norm_eps, "head_dim", self.param_dtype, name="k_norm")(k)
    q = apply_rope(q, cos, sin, cfg.rope.interleaved)
    k = apply_rope(k, cos, sin, cfg.rope.interleaved)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
    mask = attention_mask(segment_ids_BxL, cfg.sliding_window(self.layer))
    out = dot_product_attention(q, k, v, mask, cfg.softmax_scale()).reshape(b, length, -1)
    return Linear(cfg.hidden_size, ("heads", "embed"), cfg.o_bias, name="o_proj", **kw)(out)


class MultiHeadLatentAttention(nn.Module):
  """DeepSeek MLA: keys and values come from a compressed latent (kv_lora_rank) plus one shared rotary key."""
  config: ModelConfig
  layer: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids_BxL: jax.Array) -> jax.Array:
    cfg = self.config
    b, length, _ = x_BxLxD.shape
    h, nope, rope, v_dim = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if cfg.q_lora_rank is None:
      q = Linear(h * (nope + rope), ("embed", "heads"), name="q_proj", **kw)(x_BxLxD)
    else:
      q = Linear(cfg.q_lora_rank, ("embed", "q_lora"), cfg.mla_bias, name="q_a_proj", **kw)(x_BxLxD)
      q = RMSNorm(1e-6, "q_lora", self.param_dtype, name="q_a_layernorm")(q)
      q = Linear(h * (nope + rope), ("q_lora", "heads"), name="q_b_proj", **kw)(q)
    q = q.reshape(b, length, h, nope + rope)
    q_nope, q_rope = q[..., :nope], q[..., nope:]

    compressed = Linear(cfg.kv_lora_rank + rope, ("embed", "kv_lora"), cfg.mla_bias, name="kv_a_proj_with_mqa",
                        **kw)(x_BxLxD)
    latent, k_rope = compressed[..., :cfg.kv_lora_rank], compressed[..., cfg.kv_lora_rank:]
    latent = RMSNorm(1e-6, "kv_lora", self.param_dtype, name="kv_a_layernorm")(latent)
    q_rope = apply_rope(q_rope, cos, sin, cfg.rope.interleaved)
    k_rope = apply_rope(k_rope[:, :, None, :], cos, sin, cfg.rope.interleaved)

    kv = Linear(h * (nope + v_dim), ("kv_lora", "heads"), name="kv_b_proj", **kw)(latent)
    kv = kv.reshape(b, length, h, nope + v_dim)
    k_nope, v = kv[..., :nope], kv[..., nope:]
    k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope, (b, length, h, rope))], axis=-1)
    q = nn.with_logical_constraint(jnp.concatenate([q_nope, q_rope], axis=-1),
                                   ("batch", "length", "heads", "head_dim"))
    mask = attention_mask(segment_ids_BxL, cfg.sliding_window(self.layer))
    out = dot_product_attention(q, k, v, mask, cfg.softmax_scale()).reshape(b, length, h * v_dim)
    return Linear(cfg.hidden_size, ("heads", "embed"), cfg.mla_bias, name="o_proj", **kw)(out)
