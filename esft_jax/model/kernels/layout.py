"""Where each (token, expert) assignment goes in a row layout grouped by expert, each group padded to `align` rows."""

from __future__ import annotations

from typing import NamedTuple

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


def dispatch(x_TxD: jax.Array, layout: ExpertLayout) -> jax.Array:
  """[P, D]: each row's token (zeros for padding)."""
  return _gather_rows(x_TxD, layout.source_P, layout.dest_TxK)


def combine(y_PxD: jax.Array, layout: ExpertLayout) -> jax.Array:
  """[T, K, D]: each assignment's row (zeros for an expert elsewhere)."""
  t, k = layout.dest_TxK.shape
  return _gather_rows(y_PxD, layout.dest_TxK.reshape(-1), layout.assignment_P[:, None]).reshape(t, k, -1)


# The layout is a permutation (plus padding), so both directions' gradients are gathers too: each source row sums
# the rows that read it. Autodiff of a gather would scatter-add instead, which is slower on a GPU.
@jax.custom_vjp
def _gather_rows(src_NxD: jax.Array, index_M: jax.Array, readers_NxR: jax.Array) -> jax.Array:
  """src[index] (out-of-range index: zeros); readers[n] lists the rows m with index[m] = n (out of range where
  fewer than R), which is what the gradient gathers."""
  return jnp.take(src_NxD, index_M, axis=0, mode="fill", fill_value=0)


def _gather_rows_fwd(src_NxD, index_M, readers_NxR):
  return _gather_rows(src_NxD, index_M, readers_NxR), readers_NxR


def _gather_rows_bwd(readers_NxR, d_MxD):
  d_NxRxD = jnp.take(d_MxD, readers_NxR, axis=0, mode="fill", fill_value=0)
  return jnp.sum(d_NxRxD, axis=1, dtype=jnp.float32).astype(d_MxD.dtype), None, None


_gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)
