"""Grouped matmul on TPUs: the Pallas TPU kernels that jax ships (megablox `gmm` and `tgmm`), with a VJP that
computes weight gradients only for the experts that train.

    megablox_matmul(lhs_PxK, rhs_GxKxN, group_sizes_G, trained_S=None, interpret=False) -> out_PxN

Rows come grouped by expert, in any number (they are padded to whole row tiles here). Rows past
sum(group_sizes) are zero in the output and in the input gradient: the kernels leave them unwritten, and the
expert-parallel layout puts every other device's assignments there.

- forward and input gradient: `gmm` (the latter with the weights read transposed); it visits only the row tiles of
  non-empty groups.
- weight gradient: with `trained_S` None, one `tgmm` over every expert (an expert without rows gets an exact
  zero). With `trained_S` (local expert ids, traced: under expert parallelism a device's first expert is its index;
  ids outside [0, G) belong to other devices), one `tgmm` per trained expert with `group_offset` at that expert
  and one group, which visits only that expert's row tiles; the other experts' gradients are zero, never computed.
  ESFT trains a tenth of the experts, and this skips the other nine tenths of the weight-gradient matmuls.

Tiles are megablox's default (128 rows, 128 columns, 128 deep), or the whole dimension where it is smaller, as
the TPU's block shapes require; they are not tuned on a TPU. On a CPU, `interpret=True` runs the kernels in
Pallas' interpreter, and exporting for platform "tpu" lowers them to Mosaic TPU custom calls; compiling those
needs a TPU.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp

# The package re-exports `gmm` (the VJP'd op) under the kernel module's own name; the module holds both kernels.
_kernels = importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")

TILE = 128
ROW_ALIGN = 16  # rows of a bf16 tile (two per 32-bit sublane): a row tile below TILE is a multiple of this


def _tile(dim: int) -> int:
  """A block size for one matrix dimension: TILE, or the whole dimension below it (the TPU's blocks are multiples
  of 128 in the minor dimension unless they span it)."""
  return min(dim, TILE)


def row_tile(rows: int) -> int:
  return min(TILE, -(-rows // ROW_ALIGN) * ROW_ALIGN)


def _rows_in_groups(out_PxN: jax.Array, group_sizes_G: jax.Array) -> jax.Array:
  return jnp.where((jnp.arange(out_PxN.shape[0]) < jnp.sum(group_sizes_G))[:, None], out_PxN, 0)


def _gmm(lhs_PxK, rhs_GxKxN, group_sizes_G, interpret: bool, transpose_rhs: bool = False):
  n = rhs_GxKxN.shape[1] if transpose_rhs else rhs_GxKxN.shape[2]
  tiling = (row_tile(lhs_PxK.shape[0]), _tile(lhs_PxK.shape[1]), _tile(n))
  out = _kernels.gmm(lhs_PxK, rhs_GxKxN, group_sizes_G, lhs_PxK.dtype, tiling, transpose_rhs=transpose_rhs,
                     interpret=interpret)
  return _rows_in_groups(out, group_sizes_G)


def _weight_grad(lhs_PxK, dout_PxN, group_sizes_G, trained_S, dtype, interpret: bool):
  groups = group_sizes_G.shape[0]
  (rows, k), n = lhs_PxK.shape, dout_PxN.shape[1]
  tgmm = functools.partial(_kernels.tgmm, lhs_PxK.swapaxes(0, 1), dout_PxN, group_sizes_G, dtype,
                           (row_tile(rows), _tile(k), _tile(n)), interpret=interpret)
  if trained_S is None:
    return tgmm()
  grad_GxKxN = jnp.zeros((groups, k, n), dtype)
  for s in range(trained_S.shape[0]):
    held = (trained_S[s] >= 0) & (trained_S[s] < groups)
    # Another device's expert: offset past the last group, where tgmm visits no tile; its output is dropped.
    offset = jnp.where(held, trained_S[s], groups).astype(jnp.int32)
    one_1xKxN = tgmm(group_offset=offset, num_actual_groups=1)
    grad_GxKxN = grad_GxKxN.at[offset].set(one_1xKxN[0], mode="drop")
  return grad_GxKxN


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _padded_matmul(lhs_PxK, rhs_GxKxN, group_sizes_G, trained_S, interpret):
  return _gmm(lhs_PxK, rhs_GxKxN, group_sizes_G, interpret)


def _padded_matmul_fwd(lhs_PxK, rhs_GxKxN, group_sizes_G, trained_S, interpret):
  out = _gmm(lhs_PxK, rhs_GxKxN, group_sizes_G, interpret)
  return out, (lhs_PxK, rhs_GxKxN, group_sizes_G, trained_S)


def _padded_matmul_bwd(interpret, residuals, dout_PxN):
  lhs_PxK, rhs_GxKxN, group_sizes_G, trained_S = residuals
  dout_PxN = dout_PxN.astype(lhs_PxK.dtype)
  dlhs_PxK = _gmm(dout_PxN, rhs_GxKxN, group_sizes_G, interpret, transpose_rhs=True)
  drhs_GxKxN = _weight_grad(lhs_PxK, dout_PxN, group_sizes_G, trained_S, rhs_GxKxN.dtype, interpret)
  return dlhs_PxK, drhs_GxKxN, None, None


_padded_matmul.defvjp(_padded_matmul_fwd, _padded_matmul_bwd)


def megablox_matmul(lhs_PxK: jax.Array, rhs_GxKxN: jax.Array, group_sizes_G: jax.Array,
                    trained_S: jax.Array | None = None, interpret: bool = False) -> jax.Array:
  """out[r] = lhs[r] @ rhs[g(r)] for rows grouped by expert (`jax.lax.ragged_dot`'s contract), rows past the
  groups zero. `trained_S`: the local ids of the experts whose weight gradient is used (None: all); the rest get
  zero weight gradients."""
  rows = lhs_PxK.shape[0]
  pad = -rows % row_tile(rows)  # gmm takes whole row tiles
  lhs_PxK = jnp.pad(lhs_PxK, ((0, pad), (0, 0)))
  return _padded_matmul(lhs_PxK, rhs_GxKxN, group_sizes_G.astype(jnp.int32), trained_S, interpret)[:rows]


def tpu_expert_ffn(x_TxD: jax.Array, ids_TxK: jax.Array, weights_TxK: jax.Array, experts, interpret: bool = False,
                   trained_experts: tuple[int, ...] | None = None,
                   first_expert: jax.Array | int = 0) -> jax.Array:
  """`esft_jax.model.experts.expert_ffn` on the megablox kernels: the "grouped" path's sort and combine, its
  three grouped matmuls on `megablox_matmul`. `ids_TxK` index `experts` (ids outside them: other devices'
  experts, no row); `trained_experts` are global ids, experts[e] being expert first_expert + e."""
  from esft_jax.model.experts import grouped_expert_ffn  # the model module imports this one lazily

  trained_S = None
  if trained_experts is not None:
    trained_S = jnp.asarray(trained_experts, jnp.int32).reshape(-1) - first_expert
  matmul = functools.partial(megablox_matmul, trained_S=trained_S, interpret=interpret)
  return grouped_expert_ffn(x_TxD, ids_TxK, weights_TxK, experts, matmul)
