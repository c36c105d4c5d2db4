"""The decoder: (params, tokens) -> logits, each MoE layer's routing, and the balance loss, in one pass.

Used functionally: `Transformer(config).apply({"params": params}, tokens)` is a pure function, so `jax.jit`,
`jax.grad`, optax, orbax and shardings act on the plain parameter pytree.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from esft_jax.config import ModelConfig
from esft_jax.esft.trained_experts import TrainedExperts
from esft_jax.model.attention import CacheView, GroupedQueryAttention, LayerCache, MultiHeadLatentAttention
from esft_jax.model.layers import Linear, RMSNorm, SwiGLU, logical_param, rope_angles
from esft_jax.model.moe import MoEBlock, Routing, batch_aux_loss, global_balance_loss, sequence_aux_loss

Dtype = jnp.dtype


class Cache(NamedTuple):
  """The decoding cache of the whole model over S slots."""
  layers: tuple[LayerCache, ...]
  index: jax.Array  # int32 scalar: slots filled so far
  valid_BxS: jax.Array  # bool: slots holding real (non-padding) tokens


class ModelOutput(NamedTuple):
  logits: jax.Array  # [B, L, V] fp32
  routing: tuple[Routing, ...]  # one per MoE layer, in `config.moe_layer_ids` order
  aux_loss: jax.Array  # scalar, already multiplied by its coefficient (0 where the config has none)
  cache: Cache | None = None  # the updated cache when one was passed in


def init_cache(config: ModelConfig, batch: int, slots: int, dtype=jnp.float32) -> Cache:
  if config.attention == "mla":
    shapes = ((batch, slots, config.kv_lora_rank), (batch, slots, config.qk_rope_head_dim))
  else:
    shapes = ((batch, slots, config.num_kv_heads, config.head_dim),) * 2
  layers = tuple(LayerCache(jnp.zeros(shapes[0], dtype), jnp.zeros(shapes[1], dtype))
                 for _ in range(config.num_layers))
  return Cache(layers, jnp.zeros((), jnp.int32), jnp.zeros((batch, slots), bool))


class DecoderLayer(nn.Module):
  config: ModelConfig
  layer: int
  expert_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  trained_experts: tuple[int, ...] | None = None  # this layer's; see `expert_ffn`
  attention_impl: str = "auto"  # see esft_jax.model.attention.ATTENTION_IMPLS
  max_segments: int | None = None  # see esft_jax.model.attention.attend
  mesh: Mesh | None = None  # see `esft_jax.model.moe.routed_experts`

  @nn.compact
  def __call__(self, x_BxLxD, cos, sin, segment_ids_BxL, cache: CacheView | None = None,
               trained_rows: Mapping[str, jax.Array] | None = None
               ) -> tuple[jax.Array, Routing | None, LayerCache | None]:
    """`trained_rows`: see `esft_jax.model.moe.routed_experts`."""
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attention_cls = MultiHeadLatentAttention if cfg.attention == "mla" else GroupedQueryAttention
    h = RMSNorm(cfg.rms_norm_eps, param_dtype=self.param_dtype, name="input_layernorm")(x_BxLxD)
    attention = attention_cls(cfg, self.layer, attention_impl=self.attention_impl, max_segments=self.max_segments,
                              name="self_attn", **kw)
    attn, new_cache = attention(h, cos, sin, segment_ids_BxL, cache)
    x_BxLxD = x_BxLxD + attn
    h = RMSNorm(cfg.rms_norm_eps, param_dtype=self.param_dtype, name="post_attention_layernorm")(x_BxLxD)
    routing = None
    if cfg.moe_layers[self.layer]:
      y, routing = MoEBlock(cfg, self.expert_impl, trained_experts=self.trained_experts, mesh=self.mesh,
                            name="mlp", **kw)(h, trained_rows)
    else:
      y = SwiGLU(cfg.intermediate_size, name="mlp", **kw)(h)
    x_BxLxD = nn.with_logical_constraint(x_BxLxD + y, ("batch", "length", "embed"))
    return x_BxLxD, routing, new_cache


class Transformer(nn.Module):
  config: ModelConfig
  expert_impl: str = "auto"
  dtype: Dtype = jnp.float32  # activations and matmuls
  param_dtype: Dtype = jnp.float32  # parameters created by `init` (loaded checkpoints keep their own)
  # Recompute each decoder layer in the backward pass (jax.checkpoint), keeping only its input: activation
  # memory of one layer instead of all, for about a third more compute. Training only (no cache).
  remat: bool = False
  # Per MoE layer, the routed experts whose weight gradients the backward pass must produce (ESFT's trained
  # ones, `TrainPlan.trained_experts`); the expert kernels skip the others' work. None: all.
  trained_experts: TrainedExperts | None = None
  # How training and scoring attend: `esft_jax.model.attention.ATTENTION_IMPLS` (decoding uses the reference).
  attention_impl: str = "auto"
  # The most segments (packed documents) a row may hold, a static bound that makes the fused attention on a GPU
  # 2.5x faster; callers check their batches (`esft_jax.model.attention.check_segments`). None: any packing.
  max_segments: int | None = None
  # The device mesh the model runs on, which splits the routed experts' work (`esft_jax.model.moe.routed_experts`).
  # None: one device. The activation constraints take the mesh and rules of `esft_jax.sharding.logical_rules`.
  mesh: Mesh | None = None

  @nn.compact
  def __call__(self, tokens_BxL: jax.Array, segment_ids_BxL: jax.Array | None = None,
               positions_BxL: jax.Array | None = None, cache: Cache | None = None,
               trained_rows: Mapping[int, Mapping[str, jax.Array]] | None = None) -> ModelOutput:
    """`segment_ids`: 0 marks padding; packed documents carry distinct ids and never attend to each other.
    `positions` default to 0..L-1 (pass per-document positions for packed batches). With a `cache`, the
    tokens fill its next L slots and attend to every earlier non-padding slot (decoding).

    `trained_rows`: per layer with trained experts, the rows of `trained_experts` in its three expert stacks,
    which the parameters' stacks already hold (`TrainedExperts.rows_by_layer`, after `write_rows`): the gradient
    reaches them and not the stacks (`esft_jax.model.moe.routed_experts`). None: the stacks' own rows."""
    cfg = self.config
    if trained_rows is not None:
      self._check_trained_rows(trained_rows)
    b, length = tokens_BxL.shape
    if segment_ids_BxL is None:
      segment_ids_BxL = jnp.ones((b, length), jnp.int32)
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(length), (b, length))
    embedding = logical_param(self, "embed_tokens", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                              self.param_dtype)
    x = nn.with_logical_constraint(embedding[tokens_BxL].astype(self.dtype), ("batch", "length", "embed"))
    cos, sin = rope_angles(cfg, positions_BxL)
    routings, new_layers = [], []
    valid = None
    if cache is not None:
      valid = jax.lax.dynamic_update_slice(cache.valid_BxS, segment_ids_BxL != 0, (0, cache.index))
    layer_cls = nn.remat(DecoderLayer) if self.remat and cache is None else DecoderLayer
    for i in range(cfg.num_layers):
      view = None if cache is None else CacheView(cache.layers[i], cache.index, valid)
      trained = None if self.trained_experts is None else self.trained_experts.of_layer(i)
      layer = layer_cls(cfg, i, self.expert_impl, self.dtype, self.param_dtype, trained, self.attention_impl,
                        self.max_segments, self.mesh, name=f"layers_{i}")
      rows = None if trained_rows is None else trained_rows.get(i)
      x, routing, layer_cache = layer(x, cos, sin, segment_ids_BxL, view, rows)
      new_layers.append(layer_cache)
      if routing is not None:
        routings.append(routing)
    x = RMSNorm(cfg.rms_norm_eps, param_dtype=self.param_dtype, name="norm")(x)
    if cfg.tie_word_embeddings:
      logits = jnp.dot(x, embedding.astype(self.dtype).T)
    else:
      logits = Linear(cfg.vocab_size, ("embed", "vocab"), dtype=self.dtype, param_dtype=self.param_dtype,
                      name="lm_head")(x)
    logits = nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))
    new_cache = None if cache is None else Cache(tuple(new_layers), cache.index + length, valid)
    return ModelOutput(logits, tuple(routings), self._aux_loss(routings, segment_ids_BxL), new_cache)

  def _check_trained_rows(self, trained_rows: Mapping[int, Mapping[str, jax.Array]]) -> None:
    trained = [] if self.trained_experts is None else [layer for layer, ids in self.trained_experts.layers if ids]
    if sorted(trained_rows) != trained:
      raise ValueError(f"trained rows are given for layers {sorted(trained_rows)}, but the model's trained_experts "
                       f"name experts in layers {trained}: build the model with the plan's trained experts "
                       "(Transformer(trained_experts=plan.trained_experts))")

  def _aux_loss(self, routings: list[Routing], segment_ids_BxL: jax.Array) -> jax.Array:
    cfg = self.config
    if not routings or not cfg.aux_loss_kind or not cfg.aux_loss_coef:
      return jnp.zeros((), jnp.float32)
    if cfg.aux_loss_kind == "global":
      return cfg.aux_loss_coef * global_balance_loss(routings, cfg.num_experts, segment_ids_BxL != 0)
    per_layer = sequence_aux_loss if cfg.aux_loss_kind == "seq" else batch_aux_loss
    return cfg.aux_loss_coef * sum(per_layer(r, cfg.num_experts) for r in routings)


def init_params(config: ModelConfig, rng: jax.Array, param_dtype=jnp.float32, boxed: bool = False):
  """Random parameters (normal(0.02), norms at 1). `boxed=True` keeps Flax's logical-axis metadata."""
  model = Transformer(config, param_dtype=param_dtype)
  variables = model.init(rng, jnp.zeros((1, 2), jnp.int32))
  return variables["params"] if boxed else nn.unbox(variables["params"])


def logical_axes(config: ModelConfig):
  """The logical axis names of every parameter (a pytree of PartitionSpecs), without allocating parameters."""
  boxed = jax.eval_shape(lambda: init_params(config, jax.random.key(0), boxed=True))
  return nn.get_partition_spec(boxed)


class ParameterCounts(NamedTuple):
  total: int
  active_per_token: int  # excludes the input-embedding lookup and the experts a token does not use
  routed_experts: int  # all routed-expert weights
  per_expert: int  # one routed expert (gate, up, down)


def parameter_counts(config: ModelConfig) -> ParameterCounts:
  """Counted from the parameter shapes (no allocation); active counts K routed experts per MoE layer."""
  shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
  total = sum(leaf.size for leaf in jax.tree_util.tree_leaves(shapes))
  per_expert = 3 * config.hidden_size * config.moe_intermediate_size
  n_moe = len(config.moe_layer_ids)
  routed = n_moe * config.num_experts * per_expert
  idle = n_moe * (config.num_experts - config.num_experts_per_tok) * per_expert
  embedding = config.vocab_size * config.hidden_size
  return ParameterCounts(total, total - idle - embedding, routed, per_expert)
