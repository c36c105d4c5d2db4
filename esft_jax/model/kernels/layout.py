"""Where each (token, expert) assignment goes in a row layout grouped by expert, each group padded to `align` rows,
and the row gathers into it (dispatch) and out of it (combine), with gathers for gradients."""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


class ExpertLayout(NamedTuple):
  assignment_P: jax.Array  # flat (token * K + slot) assignment feeding each row; T*K (out of range) for padding
  dest_TxK: jax.Array  # row of each assignment; P (out of range) for an assignment to an expert elsewhere
  group_sizes_G: jax.Array  # rows per expert, padding included (multiples of `align`)

  @property
  def source_P(self) -> jax.Array:
    """The token feeding each row; T (out of range) for padding rows."""
    return self.assignment_P // self.dest_TxK.shape[1]


def padded_rows(num_assignments: int, num_experts: int, align: int) -> int:
  """A static bound on the padded row count: sum_e ceil(n_e / align) <= ceil(M / align) + E - 1, and
  <= M + E(align-1)."""
  tiles = -(-num_assignments // align) + num_experts - 1
  return align * min(tiles, -(-(num_assignments + num_experts * (align - 1)) // align))


def expert_layout(ids_TxK: jax.Array, num_experts: int, align: int) -> ExpertLayout:
  """Ids outside [0, num_experts) name experts on other devices (expert parallelism): they get no row, so the
  rows past the last group, which the grouped matmuls skip, are all padding."""
  t, k = ids_TxK.shape
  ids_M = ids_TxK.reshape(-1).astype(jnp.int32)
  here_M = (ids_M >= 0) & (ids_M < num_experts)
  key_M = jnp.where(here_M, ids_M, num_experts)  # sorts the others after the last group; bincount drops them
  order_M = jnp.argsort(key_M, stable=True)  # sorted position -> assignment
  sizes_G = jnp.bincount(key_M, length=num_experts).astype(jnp.int32)
  padded_G = (sizes_G + align - 1) // align * align
  shift_G = (jnp.cumsum(padded_G) - padded_G) - (jnp.cumsum(sizes_G) - sizes_G)  # padded start - packed start
  p = padded_rows(t * k, num_experts, align)
  key_sorted_M = key_M[order_M]
  row_M = jnp.where(key_sorted_M < num_experts,
                    jnp.arange(t * k, dtype=jnp.int32) + shift_G[jnp.minimum(key_sorted_M, num_experts - 1)], p)
  dest_M = jnp.zeros(t * k, jnp.int32).at[order_M].set(row_M)
  assignment_P = jnp.full(p, t * k, jnp.int32).at[row_M].set(order_M, mode="drop")
  return ExpertLayout(assignment_P, dest_M.reshape(t, k), padded_G)


def take_rows(src_NxD: jax.Array, index_M: jax.Array, scale_M: jax.Array | None = None) -> jax.Array:
  """[M, D]: src[index[m]] (indices clipped into range), times scale[m] in fp32 when given: in XLA what
  `gather.gather_rows` does in a kernel. Either is the `gather` of dispatch and combine."""
  rows_MxD = jnp.take(src_NxD, index_M, axis=0, mode="clip")
  return rows_MxD if scale_M is None else (rows_MxD.astype(jnp.float32) * scale_M[:, None]).astype(src_NxD.dtype)


Gather = Callable[..., jax.Array]  # (src_NxD, index_M, scale_M=None) -> [M, D], as take_rows


def dispatch(x_TxD: jax.Array, layout: ExpertLayout, gather: Gather = take_rows) -> jax.Array:
  """[P, D]: each row's token. Padding rows hold some token's values: their products are never read, and their
  output gradients are zero (see combine), so they add nothing to any gradient."""
  return _dispatch(gather, x_TxD, layout.source_P, layout.dest_TxK)


def combine(y_PxD: jax.Array, weights_TxK: jax.Array, layout: ExpertLayout, gather: Gather = take_rows) -> jax.Array:
  """[T, D]: each token's sum over its assignments of weight * row (an expert elsewhere contributes nothing)."""
  return _combine(gather, y_PxD, weights_TxK, layout.dest_TxK, layout.assignment_P)


# The layout is a permutation (plus padding), so both directions' gradients are gathers too: each source row sums
# the rows that read it. Autodiff of a gather would scatter-add instead, which is slower on a GPU.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dispatch(gather, x_TxD, source_P, dest_TxK):
  return gather(x_TxD, source_P)


def _dispatch_fwd(gather, x_TxD, source_P, dest_TxK):
  return _dispatch(gather, x_TxD, source_P, dest_TxK), dest_TxK


def _assignment_rows(rows_PxD, dest_TxK):
  """[T, K, D]: each assignment's row (zeros for an expert elsewhere, whose row is out of range)."""
  return jnp.take(rows_PxD, dest_TxK, axis=0, mode="fill", fill_value=0)


def _dispatch_bwd(gather, dest_TxK, dx_PxD):
  dx_TxKxD = _assignment_rows(dx_PxD, dest_TxK)
  return jnp.sum(dx_TxKxD, axis=1, dtype=jnp.float32).astype(dx_PxD.dtype), None, None


_dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _combine(gather, y_PxD, weights_TxK, dest_TxK, assignment_P):
  y_TxKxD = _assignment_rows(y_PxD, dest_TxK)
  weighted_TxKxD = y_TxKxD.astype(jnp.float32) * weights_TxK[..., None].astype(jnp.float32)
  return jnp.sum(weighted_TxKxD, axis=1).astype(y_PxD.dtype)


def _combine_fwd(gather, y_PxD, weights_TxK, dest_TxK, assignment_P):
  out_TxD = _combine(gather, y_PxD, weights_TxK, dest_TxK, assignment_P)
  return out_TxD, (y_PxD, weights_TxK, dest_TxK, assignment_P)


def _combine_bwd(gather, residuals, dout_TxD):
  y_PxD, weights_TxK, dest_TxK, assignment_P = residuals
  t, k = dest_TxK.shape
  # Row p gets its assignment's weight times its token's output gradient; a padding row gets zero.
  assignment_P_clipped = jnp.minimum(assignment_P, t * k - 1)
  scale_P = jnp.where(assignment_P < t * k, weights_TxK.reshape(-1)[assignment_P_clipped].astype(jnp.float32), 0.0)
  dy_PxD = gather(dout_TxD.astype(y_PxD.dtype), assignment_P_clipped // k, scale_P)
  y_TxKxD = _assignment_rows(y_PxD, dest_TxK)  # recomputed: keeping [T, K, D] costs more memory than a gather
  dweights_TxK = jnp.sum(y_TxKxD.astype(jnp.float32) * dout_TxD[:, None, :].astype(jnp.float32), axis=-1)
  return dy_PxD, dweights_TxK.astype(weights_TxK.dtype), None, None


_combine.defvjp(_combine_fwd, _combine_bwd)
