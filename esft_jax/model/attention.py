"""Attention: MHA/GQA (optional q/k norm, QKV clipping) and DeepSeek's multi-head latent attention (MLA).

Module and parameter names follow the Hugging Face module names (q_proj, kv_a_proj_with_mqa, ...) so the
checkpoint name map in interop stays a flat table.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from typing import NamedTuple

from esft_jax.config import ModelConfig
from esft_jax.model.kernels import hopper_available
from esft_jax.model.layers import Linear, RMSNorm, apply_rope, logical_param

Dtype = jnp.dtype
MASKED = -1e30  # finite, so a fully masked (padding) query row gives a uniform softmax instead of NaN
# How training and scoring attend (decoding always uses the reference): "reference" materialises the fp32 scores
# (einsum, softmax, einsum); "fused" is flash attention (`fused_attention`: cuDNN's on a GPU);
# "auto" is fused on a Hopper GPU at 16-bit precision (measured there; older GPUs' cuDNN takes no 192-wide MLA
# heads), the reference elsewhere.
ATTENTION_IMPLS = ("reference", "fused", "auto")


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


class LayerCache(NamedTuple):
  """One layer's decoding cache over S slots. GQA: rotated keys [B, S, G, D] and values [B, S, G, V].
  MLA: the normalised latent [B, S, kv_lora_rank] and the rotated shared key [B, S, rope_dim], never the
  expanded per-head keys and values."""
  first: jax.Array
  second: jax.Array


class CacheView(NamedTuple):
  """What a layer needs to read and write its cache: the slot of the first new token, and which slots hold
  real tokens (padding excluded), already including the new ones."""
  layer: LayerCache
  index: jax.Array
  valid_BxS: jax.Array


def cached_mask(view: CacheView, q_len: int, window: int | None) -> jax.Array:
  """[B, 1, 1, Q, S]: a new token at slot index+i sees filled, non-padding slots up to its own."""
  q_slot = view.index + jnp.arange(q_len)
  k_slot = jnp.arange(view.valid_BxS.shape[1])
  allowed = k_slot[None, :] <= q_slot[:, None]
  if window is not None:
    allowed &= k_slot[None, :] > q_slot[:, None] - window
  return (allowed[None] & view.valid_BxS[:, None, :])[:, None, None]


def _write(cache_BxSx: jax.Array, new_BxLx: jax.Array, index: jax.Array) -> jax.Array:
  # Same batch and feature dims (a cache built for another batch size or layer type would fail in the update).
  chex.assert_equal_shape([cache_BxSx, new_BxLx], dims=(0, *range(2, cache_BxSx.ndim)),
                          custom_message="KV cache [B, S, ...] against the new tokens' [B, L, ...]")
  start = (0, index) + (0,) * (cache_BxSx.ndim - 2)
  return jax.lax.dynamic_update_slice(cache_BxSx, new_BxLx.astype(cache_BxSx.dtype), start)


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


def _segment_starts(segment_ids_BxL, xp):
  """[B, L] whether a segment (a run of one nonzero id) starts at each token; xp: numpy or jax.numpy."""
  previous = xp.pad(segment_ids_BxL[:, :-1], ((0, 0), (1, 0)))
  return (segment_ids_BxL != 0) & (segment_ids_BxL != previous)


def segment_counts(segment_ids_BxL, max_segments: int):
  """[B] how many segments (runs of one nonzero id) each row packs, and [B] whether the fused attention built for
  `max_segments` takes the row: at most that many segments, and with one, the segment first (padding after).
  numpy in, numpy out (host batches and whole datasets stay on the host); jax arrays otherwise."""
  xp = np if isinstance(segment_ids_BxL, np.ndarray) else jnp
  counts_B = xp.sum(_segment_starts(segment_ids_BxL, xp), axis=1)
  fits_B = (counts_B <= max_segments) & ((max_segments > 1) | (segment_ids_BxL[:, 0] != 0) | (counts_B == 0))
  return counts_B, fits_B


def most_segments(segment_ids_NxL: np.ndarray) -> int:
  """The most segments any row packs (at least 1): the tightest `max_segments` for these rows."""
  counts_N, _ = segment_counts(np.asarray(segment_ids_NxL), 1)
  return max(1, int(counts_N.max(initial=0)))


def check_segments(segment_ids_BxL: np.ndarray, max_segments: int, where: str) -> None:
  """Raises a clear error where a batch has a row that the fused attention, built for `max_segments` segments per
  row, would turn into NaN."""
  counts_B, fits_B = segment_counts(np.asarray(segment_ids_BxL), max_segments)
  if fits_B.all():
    return
  row = int(np.flatnonzero(~fits_B)[0])
  if counts_B[row] > max_segments:
    raise ValueError(f"{where}: row {row} packs {counts_B[row]} segments, but the fused attention was built for at "
                     f"most max_segments={max_segments} per row: set max_segments to {int(counts_B.max())} or more "
                     f"(`most_segments` of the rows), or use the reference attention")
  raise ValueError(f"{where}: row {row} starts with padding, but with max_segments=1 the fused attention needs "
                   f"each row's segment first: set max_segments to 2 or more")


def segment_spans(segment_ids_BxL: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array]:
  """Each row's segments in cuDNN's packed layout: start offsets [B, M + 1] and lengths [B, M], -1 past a row's
  last segment (M = max_segments; a row's segments past the M-th are left out)."""
  seg = segment_ids_BxL
  first = lambda flags: jnp.nonzero(flags, size=max_segments, fill_value=-1)[0]
  starts_BxM = jax.vmap(first)(_segment_starts(seg, jnp))
  ends_BxM = jax.vmap(first)(_segment_starts(seg[:, ::-1], jnp)[:, ::-1])  # a segment ends where, reversed, it starts
  lengths_BxM = jnp.where(starts_BxM >= 0, ends_BxM - starts_BxM + 1, -1)
  offsets = jnp.pad(starts_BxM, ((0, 0), (0, 1)), constant_values=-1)
  return offsets.astype(jnp.int32), lengths_BxM.astype(jnp.int32)


@jax.custom_vjp
def _gradient_where(x_BxLx: jax.Array, keep_BxL: jax.Array) -> jax.Array:
  """x, with the gradient replaced by zero where `keep` is false."""
  return x_BxLx


def _gradient_where_fwd(x_BxLx, keep_BxL):
  return x_BxLx, keep_BxL


def _gradient_where_bwd(keep_BxL, g_BxLx):
  keep = keep_BxL.reshape(keep_BxL.shape + (1,) * (g_BxLx.ndim - 2))
  return jnp.where(keep, g_BxLx, jnp.zeros_like(g_BxLx)), None


_gradient_where.defvjp(_gradient_where_fwd, _gradient_where_bwd)


def _cudnn_segments(q_BxQxHxD: jax.Array, k_BxKxGxD: jax.Array, v_BxKxGxV: jax.Array, segment_ids_BxL: jax.Array,
                    scale: float, max_segments: int) -> jax.Array:
  """cuDNN's flash attention, causal within each segment, with no mask tensor. jax.nn's API takes segments only
  as a bias, which makes cuDNN about 2.5x slower (BENCHMARKS.md, attention), so this calls jax's cuDNN entry point,
  which has no public name.
  - One segment per row, first: per-row lengths describe it; MLA's values keep their own width.
  - More: cuDNN's packed layout, segment offsets and lengths. jax (0.11) scales every offset by the query's
    heads x width, so keys and values get the query's heads here (repeated), and all three one width (the
    narrower zero-padded)."""
  from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention as cudnn_attention

  # cuDNN's backward leaves its gradients at tokens outside every segment (padding) unwritten: zero them.
  real_BxL = segment_ids_BxL != 0
  q_BxQxHxD, k_BxKxGxD, v_BxKxGxV = (_gradient_where(x, real_BxL) for x in (q_BxQxHxD, k_BxKxGxD, v_BxKxGxV))
  if max_segments == 1:
    lengths_B = jnp.sum(real_BxL, axis=1, dtype=jnp.int32)
    return cudnn_attention(q_BxQxHxD, k_BxKxGxD, v_BxKxGxV, q_seqlen=lengths_B, kv_seqlen=lengths_B, scale=scale,
                           mask_type=MaskType.PADDING_CAUSAL)
  heads, v_width = q_BxQxHxD.shape[2], v_BxKxGxV.shape[3]
  width = max(q_BxQxHxD.shape[3], v_width)
  widen = lambda x: jnp.pad(jnp.repeat(x, heads // x.shape[2], axis=2), [(0, 0)] * 3 + [(0, width - x.shape[-1])])
  offsets, lengths = segment_spans(segment_ids_BxL, max_segments)
  out = cudnn_attention(widen(q_BxQxHxD), widen(k_BxKxGxD), widen(v_BxKxGxV), q_seqlen=lengths, kv_seqlen=lengths,
                        q_offsets=offsets, kv_offsets=offsets, scale=scale, mask_type=MaskType.PADDING_CAUSAL)
  return out[..., :v_width]


def fused_attention(q_BxQxHxD: jax.Array, k_BxKxGxD: jax.Array, v_BxKxGxV: jax.Array, segment_ids_BxL: jax.Array,
                    window: int | None, scale: float, max_segments: int | None = None) -> jax.Array:
  """`dot_product_attention` without the [B, H, Q, K] scores in memory.
  - `max_segments` set, on a GPU without a sliding window: cuDNN's flash attention given the segments
    (`_cudnn_segments`), 2.5x faster than with a mask. The bound is static: a row that `segment_counts` says does
    not fit comes out as NaN, on every backend alike (callers check their batches with `check_segments` for a
    clear error).
  - Otherwise `jax.nn.dot_product_attention` with the mask as a bias, which takes any packing (on a GPU cuDNN,
    whose backward also writes that bias's unused gradient; elsewhere XLA's). Keys and values need one head width
    there: the narrower (MLA's values) is zero-padded, which changes neither scores nor outputs, and is cut off.
  Flash attention drops a padding query's keys altogether, where the reference averages over every key (the mask
  blocks them all alike); such rows are given that average here, so both agree everywhere (DeepSeek's balance
  loss counts padding tokens)."""
  if max_segments is not None and max_segments < 1:
    raise ValueError(f"max_segments={max_segments}: a row holds at least one segment; pass 1 or more")
  d, v_width = k_BxKxGxD.shape[-1], v_BxKxGxV.shape[-1]
  gpu = jax.default_backend() == "gpu"
  if gpu and window is None and max_segments is not None:
    out = _cudnn_segments(q_BxQxHxD, k_BxKxGxD, v_BxKxGxV, segment_ids_BxL, scale, max_segments)
  else:
    width = max(d, v_width)
    pad = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, width - x.shape[-1])])
    mask_Bx1xQxK = attention_mask(segment_ids_BxL, window)[:, 0]
    out = jax.nn.dot_product_attention(pad(q_BxQxHxD), pad(k_BxKxGxD), pad(v_BxKxGxV), mask=mask_Bx1xQxK,
                                       scale=scale, is_causal=True, implementation="cudnn" if gpu else "xla")
    out = out[..., :v_width]
  if max_segments is not None:
    _, fits_B = segment_counts(segment_ids_BxL, max_segments)
    out = jnp.where(fits_B[:, None, None, None], out, jnp.nan)
  h, g = q_BxQxHxD.shape[2], k_BxKxGxD.shape[2]
  padding_BxQx1x1 = (segment_ids_BxL == 0)[:, :, None, None]
  mean_v = jnp.repeat(jnp.mean(v_BxKxGxV, axis=1, keepdims=True), h // g, axis=2)  # [B, 1, H, V], heads as q's
  return jnp.where(padding_BxQx1x1, mean_v.astype(out.dtype), out)


def resolve_attention_impl(impl: str, dtype) -> str:
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl={impl!r}: expected one of {ATTENTION_IMPLS}")
  gpu, half = jax.default_backend() == "gpu", jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
  if impl == "fused" and gpu and not half:
    raise ValueError(f"attention_impl='fused' runs cuDNN's flash attention on a GPU, which takes bfloat16 or "
                     f"float16, not {jnp.dtype(dtype).name}: compute in bfloat16 or use attention_impl='auto'")
  if impl == "auto":
    return "fused" if hopper_available() and half else "reference"
  return impl


def attend(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids_BxL: jax.Array, window: int | None, scale: float,
           impl: str, max_segments: int | None = None) -> jax.Array:
  """Training and scoring attention over the whole (packed) sequence: [B, L, H, V]. `max_segments`: the most
  segments a row may pack, a static bound of the fused path's fastest form (see `fused_attention`); None: any."""
  if resolve_attention_impl(impl, q.dtype) == "fused":
    return fused_attention(q, k, v, segment_ids_BxL, window, scale, max_segments)
  return dot_product_attention(q, k, v, attention_mask(segment_ids_BxL, window), scale)


class GroupedQueryAttention(nn.Module):
  config: ModelConfig
  layer: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = "auto"  # see ATTENTION_IMPLS
  max_segments: int | None = None  # see `attend`

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids_BxL: jax.Array,
               cache: CacheView | None = None) -> tuple[jax.Array, LayerCache | None]:
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
    window = cfg.sliding_window(self.layer)
    new_cache = None
    if cache is None:
      out = attend(q, k, v, segment_ids_BxL, window, cfg.softmax_scale(), self.attention_impl,
                   self.max_segments)
    else:
      new_cache = LayerCache(_write(cache.layer.first, k, cache.index), _write(cache.layer.second, v, cache.index))
      k, v = new_cache.first.astype(q.dtype), new_cache.second.astype(q.dtype)
      out = dot_product_attention(q, k, v, cached_mask(cache, length, window), cfg.softmax_scale())
    out = out.reshape(b, length, -1)
    return Linear(cfg.hidden_size, ("heads", "embed"), cfg.o_bias, name="o_proj", **kw)(out), new_cache


class MultiHeadLatentAttention(nn.Module):
  """DeepSeek MLA: keys and values come from a compressed latent (kv_lora_rank) plus one shared rotary key.

  Training expands the latent into per-head keys and values. Decoding caches only the latent and the rotary
  key and absorbs kv_b_proj into the query and the output (scores = q_nope W_uk . latent + q_rope . k_rope),
  which computes the same attention without ever materialising the heads."""
  config: ModelConfig
  layer: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = "auto"  # see ATTENTION_IMPLS
  max_segments: int | None = None  # see `attend`

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids_BxL: jax.Array,
               cache: CacheView | None = None) -> tuple[jax.Array, LayerCache | None]:
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
    k_rope = apply_rope(k_rope[:, :, None, :], cos, sin, cfg.rope.interleaved)[:, :, 0]
    w_kv = KvUpProjection(cfg.kv_lora_rank, h * (nope + v_dim), self.param_dtype, name="kv_b_proj")()
    w_kv = w_kv.astype(self.dtype).reshape(cfg.kv_lora_rank, h, nope + v_dim)
    window = cfg.sliding_window(self.layer)

    if cache is None:
      kv = jnp.einsum("blc,chd->blhd", latent, w_kv)
      k_nope, v = kv[..., :nope], kv[..., nope:]
      k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None], (b, length, h, rope))], axis=-1)
      q = nn.with_logical_constraint(jnp.concatenate([q_nope, q_rope], axis=-1),
                                     ("batch", "length", "heads", "head_dim"))
      out = attend(q, k, v, segment_ids_BxL, window, cfg.softmax_scale(), self.attention_impl,
                   self.max_segments)
      new_cache = None
    else:
      new_cache = LayerCache(_write(cache.layer.first, latent, cache.index),
                             _write(cache.layer.second, k_rope, cache.index))
      latent_all, k_rope_all = new_cache.first.astype(q.dtype), new_cache.second.astype(q.dtype)
      q_latent = jnp.einsum("blhn,chn->blhc", q_nope, w_kv[..., :nope])
      scores = (jnp.einsum("blhc,bsc->bhls", q_latent, latent_all)
                + jnp.einsum("blhr,bsr->bhls", q_rope, k_rope_all)).astype(jnp.float32) * cfg.softmax_scale()
      mask = cached_mask(cache, length, window)[:, 0]
      probs = jax.nn.softmax(jnp.where(mask, scores, MASKED), axis=-1).astype(latent_all.dtype)
      out_latent = jnp.einsum("bhls,bsc->blhc", probs, latent_all)
      out = jnp.einsum("blhc,chv->blhv", out_latent, w_kv[..., nope:])
    out = out.reshape(b, length, h * v_dim)
    return Linear(cfg.hidden_size, ("heads", "embed"), cfg.mla_bias, name="o_proj", **kw)(out), new_cache


class KvUpProjection(nn.Module):
  """kv_b_proj's kernel [kv_lora_rank, heads * (nope + v)], used both expanded and absorbed."""
  in_features: int
  out_features: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self) -> jax.Array:
    return logical_param(self, "kernel", (self.in_features, self.out_features), ("kv_lora", "heads"),
                         self.param_dtype)
