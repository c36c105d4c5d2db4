"""Building blocks: linear maps with logical axis names, RMSNorm, SwiGLU, rotary embeddings (default and YaRN).

Kernels are stored [in, out] (Flax's convention; Hugging Face stores [out, in] and interop transposes).
Every parameter carries logical axis names so a rules table can shard it; nothing here names a mesh.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from esft_jax.config import ModelConfig, RopeConfig, yarn_mscale

Dtype = jnp.dtype
default_init = nn.initializers.normal(stddev=0.02)


def logical_param(module: nn.Module, name: str, shape: Sequence[int], axes: Sequence[str | None], dtype: Dtype,
                  init=default_init) -> jax.Array:
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


class Linear(nn.Module):
  """y = x @ kernel (+ bias); kernel [in, out] named by `axes`."""
  features: int
  axes: tuple[str | None, str | None]
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = logical_param(self, "kernel", (x.shape[-1], self.features), self.axes, self.param_dtype)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      y = y + logical_param(self, "bias", (self.features,), self.axes[1:], self.param_dtype,
                            nn.initializers.zeros).astype(self.dtype)
    return y


class RMSNorm(nn.Module):
  """Normalises in fp32, casts back to the input dtype, then scales (the order transformers uses)."""
  eps: float = 1e-6
  axis_name: str = "embed"
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = logical_param(self, "scale", (x.shape[-1],), (self.axis_name,), self.param_dtype, nn.initializers.ones)
    x32 = x.astype(jnp.float32)
    normed = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)).astype(x.dtype)
    return scale.astype(x.dtype) * normed


class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x)): the dense MLP and the (fused) shared experts."""
  width: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    gate = Linear(self.width, ("embed", "mlp"), name="gate_proj", **kw)(x)
    up = Linear(self.width, ("embed", "mlp"), name="up_proj", **kw)(x)
    h = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
    return Linear(x.shape[-1], ("mlp", "embed"), name="down_proj", **kw)(h)


def rope_frequencies(rope: RopeConfig, dim: int) -> tuple[np.ndarray, float]:
  """Inverse frequencies [dim/2] and the cos/sin multiplier, as transformers computes them (YaRN included)."""
  exponents = np.arange(0, dim, 2, dtype=np.float32) / dim
  pos_freqs = (rope.theta ** exponents).astype(np.float32)
  inv_freq = (1.0 / pos_freqs).astype(np.float32)
  if rope.kind == "default":
    return inv_freq, 1.0
  factor = rope.factor
  if rope.attention_factor is not None:
    attention_factor = rope.attention_factor
  elif rope.mscale and rope.mscale_all_dim:
    attention_factor = yarn_mscale(factor, rope.mscale) / yarn_mscale(factor, rope.mscale_all_dim)
  else:
    attention_factor = yarn_mscale(factor)

  def correction_dim(rotations: float) -> float:
    return dim * math.log(rope.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

  low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
  if rope.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001  # avoids a zero-width ramp
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
  extrapolation_weight = (1 - ramp).astype(np.float32)
  interpolation = (1.0 / (factor * pos_freqs)).astype(np.float32)
  return (interpolation * (1 - extrapolation_weight) + inv_freq * extrapolation_weight).astype(np.float32), \
      float(attention_factor)


def rope_angles(config: ModelConfig, positions_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos and sin [B, L, rope_dim/2] for the given integer positions (YaRN's multiplier folded in)."""
  inv_freq, multiplier = rope_frequencies(config.rope, config.rope_dim)
  angles = positions_BxL[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
  return jnp.cos(angles) * multiplier, jnp.sin(angles) * multiplier


def apply_rope(x_BxLxHxR: jax.Array, cos_BxLxR2: jax.Array, sin_BxLxR2: jax.Array, interleaved: bool) -> jax.Array:
  """Rotates pairs of features by position. `interleaved` pairs (x0, x1), (x2, x3), ... (DeepSeek, GPT-J);
  otherwise (x_i, x_{i+R/2}) (NeoX / Llama). Computed in fp32 and cast back."""
  x = x_BxLxHxR.astype(jnp.float32)
  cos, sin = cos_BxLxR2[:, :, None, :], sin_BxLxR2[:, :, None, :]
  if interleaved:
    even, odd = x[..., 0::2], x[..., 1::2]
    out = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1).reshape(x.shape)
  else:
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]
    out = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return out.astype(x_BxLxHxR.dtype)
