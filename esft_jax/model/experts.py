"""Routed-expert compute behind one interface, dropless on every path.

    expert_ffn(x_TxD, ids_TxK, weights_TxK, experts, impl, trained_experts=None, first_expert=0) -> out_TxD

`experts` holds the stacked SwiGLU weights of one MoE layer: gate_proj/up_proj [E, D, F], down_proj [E, F, D].
Each token's output is the sum over its K chosen experts of weight * expert(x), as in transformers.
`trained_experts` names the experts whose weight gradients the caller uses (ESFT: the trained ones; None:
all); "gpu" and "tpu" skip the others' weight-gradient matmuls ("gpu" leaves their entries unwritten, arbitrary
values; "tpu" zero: read only the experts named), the other paths compute them all.

Expert parallelism: `experts` may hold a device's slice of the experts, global ids first_expert to
first_expert + E - 1 (first_expert may be traced). Assignments to the other experts contribute nothing: they
become local id E, which the one-hot of "reference" leaves out (that path still runs every local expert on every
token) and the grouped paths sort past the last group, where `lax.ragged_dot` and the "tiled" kernels compute
nothing (the "ragged" kernels compute those rows as zeros; megablox skips them and "tpu" zeroes them). Ids stay
global everywhere else (`trained_experts` too).

- "reference": every expert on every token, zero weight where not chosen. Obviously correct, O(E) work;
  kept as the oracle that the fast paths are tested against.
- "grouped": sort the T*K (token, expert) assignments by expert and run one grouped matmul per projection
  (`jax.lax.ragged_dot`); no capacity, so no token is ever dropped.
- "gpu": the same grouping on Mosaic GPU grouped-matmul kernels for Hopper (`esft_jax.model.kernels`), with
  their own gradients; rows are padded per expert to whole tiles, still dropless.
- "tpu": the same grouping on the Pallas TPU grouped matmuls that jax ships (megablox `gmm` / `tgmm`,
  `esft_jax.model.kernels.megablox`), with their own gradients.
- "auto": "gpu" on a Hopper GPU, "tpu" on a TPU; on CPU "reference" unless its [E, T, F] intermediate is large
  (XLA:CPU runs `lax.ragged_dot` 3-5x slower than the dense path even at 64 experts top-4, fwd+bwd, T=1024, D=128,
  F=64); else "grouped".
"""

from __future__ import annotations

from typing import Callable, Mapping

import chex
import jax
import jax.numpy as jnp

from esft_jax.model.kernels import hopper_available

EXPERT_IMPLS = ("reference", "grouped", "gpu", "tpu", "auto")


def reference_expert_ffn(x_TxD, ids_TxK, weights_TxK, experts: Mapping[str, jax.Array]) -> jax.Array:
  num_experts = experts["gate_proj"].shape[0]
  # Dense [T, E] combine weights: zero for the experts a token did not choose.
  combine_TxE = jnp.sum(jax.nn.one_hot(ids_TxK, num_experts, dtype=x_TxD.dtype)
                        * weights_TxK[..., None].astype(x_TxD.dtype), axis=1)
  gate_ExTxF = jnp.einsum("td,edf->etf", x_TxD, experts["gate_proj"])
  up_ExTxF = jnp.einsum("td,edf->etf", x_TxD, experts["up_proj"])
  # Weighted before the down projection (it is linear), which then sums over experts and width in one matmul:
  # no [E, T, D] intermediate, which at 256 experts of width 32 would be 8x the [E, T, F] ones.
  hidden_ExTxF = jax.nn.silu(gate_ExTxF) * up_ExTxF * combine_TxE.T[..., None]
  return jnp.einsum("etf,efd->td", hidden_ExTxF, experts["down_proj"])


def grouped_expert_ffn(x_TxD, ids_TxK, weights_TxK, experts: Mapping[str, jax.Array],
                       matmul: Callable = jax.lax.ragged_dot) -> jax.Array:
  """`matmul(lhs_PxK, rhs_GxKxN, group_sizes_G)`: a grouped matmul with `jax.lax.ragged_dot`'s contract."""
  t, k = ids_TxK.shape
  num_experts = experts["gate_proj"].shape[0]
  flat_ids = ids_TxK.reshape(-1)
  order = jnp.argsort(flat_ids, stable=True)  # assignment rows grouped by expert
  # Ids E (experts elsewhere) sort last and fall outside every group.
  group_sizes = jnp.bincount(flat_ids, length=num_experts).astype(jnp.int32)
  x_sorted = x_TxD[order // k]
  gate = matmul(x_sorted, experts["gate_proj"], group_sizes)
  up = matmul(x_sorted, experts["up_proj"], group_sizes)
  y_sorted = matmul(jax.nn.silu(gate) * up, experts["down_proj"], group_sizes)
  # Rows past the last group are zeroed here: ragged_dot's documentation does not say what it leaves there.
  y_sorted = jnp.where((jnp.arange(t * k) < jnp.sum(group_sizes))[:, None], y_sorted, 0)
  y_TxKxD = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(t, k, -1)
  return jnp.sum(y_TxKxD * weights_TxK[..., None].astype(y_TxKxD.dtype), axis=1)


# Above this many elements in the dense path's [E, T, F] activations, CPUs fall back to "grouped".
_CPU_DENSE_LIMIT = 2**28


def _auto_impl(num_tokens: int, experts: Mapping[str, jax.Array]) -> str:
  if hopper_available():
    return "gpu"
  if jax.default_backend() == "tpu":
    return "tpu"
  num_experts, _, width = experts["gate_proj"].shape
  if jax.default_backend() == "cpu" and num_experts * num_tokens * width <= _CPU_DENSE_LIMIT:
    return "reference"
  return "grouped"


@jax.custom_vjp
def rows_already_in(stack_ExDxF: jax.Array, rows_SxDxF: jax.Array, ids_S: jax.Array) -> jax.Array:
  """`stack` as it is, which already holds `rows` at `ids` (same dtype); differentiates like writing them there:
  the rows get the gradient at their ids, a gather, and the stack none. Ids outside the stack (expert
  parallelism: another device's experts) name rows it does not hold, whose gradient is zero."""
  del rows_SxDxF, ids_S
  return stack_ExDxF


def _rows_already_in_fwd(stack_ExDxF, rows_SxDxF, ids_S):
  del rows_SxDxF
  return stack_ExDxF, ids_S


def _rows_already_in_bwd(ids_S, grad_ExDxF):
  experts = grad_ExDxF.shape[0]
  held_S = (ids_S >= 0) & (ids_S < experts)
  rows = jnp.where(held_S[:, None, None], grad_ExDxF[jnp.clip(ids_S, 0, experts - 1)], 0).astype(grad_ExDxF.dtype)
  # The rows are made here, apart from their consumers. Left to itself, XLA fuses this gather into each reader of
  # the rows' gradient, the AdamW update among them, which runs after the whole backward pass: every layer's
  # stack-sized gradient (the kernels' [E, D, F] output, 78 x 369 MB at DeepSeek-V2-Lite's size) then stays
  # allocated until the update. The 27-layer step's temporaries at 1 x 2048 tokens: 26.9 GiB fused, 9.6 GiB
  # with the barrier (BENCHMARKS.md).
  return None, jax.lax.optimization_barrier(rows), None


rows_already_in.defvjp(_rows_already_in_fwd, _rows_already_in_bwd)


def check_expert_inputs(x_TxD, ids_TxK, weights_TxK, experts: Mapping[str, jax.Array]) -> None:
  """The shapes every expert path expects, checked at trace time: a mismatch fails here, naming the arrays,
  instead of deep inside a sort, a `ragged_dot`, a kernel or a `shard_map`."""
  chex.assert_rank([x_TxD, ids_TxK, weights_TxK], 2)
  chex.assert_type(ids_TxK, int)
  chex.assert_equal_shape([ids_TxK, weights_TxK], custom_message="expert ids [T, K] and their weights [T, K]")
  num_experts, hidden, width = experts["gate_proj"].shape
  chex.assert_shape(x_TxD, (ids_TxK.shape[0], hidden), custom_message="tokens [T, D] against ids [T, K]")
  chex.assert_shape(experts["up_proj"], (num_experts, hidden, width), custom_message="up_proj [E, D, F]")
  chex.assert_shape(experts["down_proj"], (num_experts, width, hidden), custom_message="down_proj [E, F, D]")


def expert_ffn(x_TxD, ids_TxK, weights_TxK, experts: Mapping[str, jax.Array], impl: str = "grouped",
               trained_experts: tuple[int, ...] | None = None, first_expert: jax.Array | int = 0) -> jax.Array:
  check_expert_inputs(x_TxD, ids_TxK, weights_TxK, experts)
  if impl == "auto":
    impl = _auto_impl(x_TxD.shape[0], experts)
  num_experts = experts["gate_proj"].shape[0]
  local_TxK = ids_TxK - first_expert
  ids_TxK = jnp.where((local_TxK >= 0) & (local_TxK < num_experts), local_TxK, num_experts)
  if impl == "reference":
    return reference_expert_ffn(x_TxD, ids_TxK, weights_TxK, experts)
  if impl == "grouped":
    return grouped_expert_ffn(x_TxD, ids_TxK, weights_TxK, experts)
  if impl == "gpu":
    from esft_jax.model.kernels.ffn import gpu_expert_ffn  # imports Pallas' Mosaic GPU backend

    return gpu_expert_ffn(x_TxD, ids_TxK, weights_TxK, experts, trained_experts=trained_experts,
                          first_expert=first_expert)
  if impl == "tpu":
    from esft_jax.model.kernels.megablox import tpu_expert_ffn  # imports Pallas' TPU backend

    return tpu_expert_ffn(x_TxD, ids_TxK, weights_TxK, experts, trained_experts=trained_experts,
                          first_expert=first_expert)
  raise ValueError(f"expert implementation {impl!r} is unknown; use one of {EXPERT_IMPLS}")
