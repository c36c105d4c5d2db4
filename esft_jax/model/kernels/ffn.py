"""The routed-expert SwiGLU on the GPU kernels: dispatch rows into an expert-grouped layout, the SwiGLU
(silu(x @ gate) * (x @ up)) @ down per expert (one op with its own backward on "tiled"), combine. Same function as
`esft_jax.model.experts.expert_ffn`, dropless."""

from __future__ import annotations

import functools
from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from esft_jax.model.kernels import gather, hopper_available, tiled
from esft_jax.model.kernels.layout import combine, dispatch, expert_layout, take_rows

KERNELS = ("tiled", "ragged")


class KernelOps(NamedTuple):
  """A kernel family's grouped matmuls on rows grouped by expert, each group a multiple of `align` rows (rows past
  sum(group_sizes): unspecified, never read). Both take (..., group_sizes, trained_experts=None, first_group=0):
  `trained_experts` names the experts whose weight gradient the caller uses (None: all; global ids, a stack's
  row g being expert first_group + g); the "tiled" kernels skip the others' (left unwritten), "ragged" computes
  every one."""

  matmul: Callable  # (lhs_PxK, rhs_GxKxN, group_sizes_G, ...) -> lhs @ rhs
  # (x_PxD, gate_GxDxF, up_GxDxF, down_GxFxD, group_sizes_G, ...) -> (silu(x @ gate) * (x @ up)) @ down
  swiglu: Callable
  align: int


def kernel_ops(kernel: str, interpret: bool = False) -> KernelOps:
  """The grouped matmuls of a kernel family; widths the kernels don't tile fall back to `jax.lax.ragged_dot`."""
  if kernel == "tiled":
    align = tiled.ALIGN
    fast = lambda a, b, g, w, first: tiled.tiled_matmul(a, b, g, interpret, w, first)
    fast_swiglu = lambda x, gate, up, down, g, w, first: tiled.tiled_swiglu(x, gate, up, down, g, interpret, w, first)
  elif kernel == "ragged":
    from esft_jax.model.kernels import ragged  # imports jax's kernels, which import jax's test utilities

    align = 1
    # jax's kernels need sum(group_sizes) = rows: the rows past the groups (padding, zeros) join the last group,
    # exact but computed; under expert parallelism that is every other device's assignments, so prefer "tiled".
    fast = lambda a, b, g, *_: ragged.ragged_matmul(a, b, g.at[-1].add(a.shape[0] - jnp.sum(g)))
    fast_swiglu = None
  else:
    raise ValueError(f"GPU kernel {kernel!r} is unknown; use one of {KERNELS}")

  def runs_fast(lhs_PxK, rhs_GxKxN):
    return tiled.supported(rhs_GxKxN.shape[1], rhs_GxKxN.shape[2], lhs_PxK.dtype) and lhs_PxK.dtype == rhs_GxKxN.dtype

  def matmul(lhs_PxK, rhs_GxKxN, group_sizes_G, trained_experts=None, first_group=0):
    if runs_fast(lhs_PxK, rhs_GxKxN):
      return fast(lhs_PxK, rhs_GxKxN, group_sizes_G, trained_experts, first_group)
    return jax.lax.ragged_dot(lhs_PxK, rhs_GxKxN, group_sizes_G)

  def swiglu(x_PxD, gate_GxDxF, up_GxDxF, down_GxFxD, group_sizes_G, trained_experts=None, first_group=0):
    groups = (group_sizes_G, trained_experts, first_group)
    if fast_swiglu is not None and all(runs_fast(x_PxD, w) for w in (gate_GxDxF, up_GxDxF, down_GxFxD)):
      return fast_swiglu(x_PxD, gate_GxDxF, up_GxDxF, down_GxFxD, *groups)
    gate_PxF, up_PxF = (matmul(x_PxD, w, *groups) for w in (gate_GxDxF, up_GxDxF))
    return matmul(jax.nn.silu(gate_PxF) * up_PxF, down_GxFxD, *groups)

  return KernelOps(matmul, swiglu, align)


def gpu_expert_ffn(
  x_TxD: jax.Array,
  ids_TxK: jax.Array,
  weights_TxK: jax.Array,
  experts: Mapping[str, jax.Array],
  kernel: str = "tiled",
  interpret: bool = False,
  trained_experts: tuple[int, ...] | None = None,
  first_expert: jax.Array | int = 0,
) -> jax.Array:
  """Each token's sum over its K experts of weight * SwiGLU_e(x), on the grouped-matmul kernels of `kernel`.
  `interpret` runs the "tiled" kernels in Pallas' GPU interpreter (CPU tests). `ids_TxK` index `experts`; ids
  outside them (expert parallelism: experts on other devices) get no row and contribute nothing.
  `trained_experts` (global ids, experts[e] being expert first_expert + e): see
  `esft_jax.model.experts.expert_ffn`."""
  if not (interpret or hopper_available()):
    raise ValueError(f"the GPU expert kernels need a Hopper GPU, found {jax.devices()[0]}; use impl='auto'")
  ops = kernel_ops(kernel, interpret)
  layout = expert_layout(ids_TxK, experts["gate_proj"].shape[0], ops.align)
  rows_kernel = gather.supported(x_TxD.shape[1], x_TxD.dtype)
  gather_rows = functools.partial(gather.gather_rows, interpret=interpret) if rows_kernel else take_rows
  x_PxD = dispatch(x_TxD, layout, gather_rows)
  y_PxD = ops.swiglu(x_PxD, experts["gate_proj"], experts["up_proj"], experts["down_proj"], layout.group_sizes_G,
                     trained_experts, first_expert)
  return combine(y_PxD, weights_TxK, layout, gather_rows)
