"""Grouped matmul on the Mosaic GPU kernels that jax ships (`jax.experimental.pallas.ops.gpu`), with a VJP.

    ragged_matmul(lhs_MxK, rhs_GxKxN, group_sizes_G) -> out_MxN

Rows are grouped by expert with no padding; a row tile that spans two groups is computed once per group. The
kernels' TMA copies need a multiple of 8 rows: other row counts get zero rows appended to the last group.
Forward and input gradient: `ragged_dot_mgpu.ragged_dot` (the latter with the weights read transposed); weight
gradient: `transposed_ragged_dot_mgpu.transposed_ragged_dot`, which skips empty groups (exact zeros).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu

# Block shape and pipelining: the best of a sweep of the forward kernel on an H200 (../shared/baselines.md).
BLOCKS = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=4)


def _rows_to_multiple_of_8(rows_MxN, group_sizes_G):
  pad = -rows_MxN.shape[0] % 8
  return jnp.pad(rows_MxN, ((0, pad), (0, 0))), group_sizes_G.at[-1].add(pad)


@jax.custom_vjp
def ragged_matmul(lhs_MxK, rhs_GxKxN, group_sizes_G):
  """out[r] = lhs[r] @ rhs[g(r)] for rows grouped by expert; sum(group_sizes) must equal M."""
  lhs_MxK_8, group_sizes_G_8 = _rows_to_multiple_of_8(lhs_MxK, group_sizes_G)
  out = ragged_dot_mgpu.ragged_dot(lhs_MxK_8, rhs_GxKxN, group_sizes=group_sizes_G_8, **BLOCKS)
  return out[: lhs_MxK.shape[0]]


def _ragged_matmul_fwd(lhs_MxK, rhs_GxKxN, group_sizes_G):
  return ragged_matmul(lhs_MxK, rhs_GxKxN, group_sizes_G), (lhs_MxK, rhs_GxKxN, group_sizes_G)


def _ragged_matmul_bwd(residuals, dout_MxN):
  lhs_MxK, rhs_GxKxN, group_sizes_G = residuals
  m = lhs_MxK.shape[0]
  lhs_MxK, _ = _rows_to_multiple_of_8(lhs_MxK, group_sizes_G)
  dout_MxN, group_sizes_G = _rows_to_multiple_of_8(dout_MxN.astype(lhs_MxK.dtype), group_sizes_G)
  dlhs_MxK = ragged_dot_mgpu.ragged_dot(dout_MxN, rhs_GxKxN, group_sizes=group_sizes_G, transpose_rhs=True, **BLOCKS)
  drhs_GxKxN = transposed_ragged_dot_mgpu.transposed_ragged_dot(lhs_MxK, dout_MxN, group_sizes=group_sizes_G, **BLOCKS)
  return dlhs_MxK[:m], drhs_GxKxN, None


ragged_matmul.defvjp(_ragged_matmul_fwd, _ragged_matmul_bwd)
