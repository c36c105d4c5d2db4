"""Where each (token, expert) assignment goes in a row layout grouped by expert, each group padded to `align` rows."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class ExpertLayout(NamedTuple):
  source_P: jax.Array  # token feeding each row; T (out of range) for padding rows
  dest_TxK: jax.Array  # row of each assignment; P (out of range) for an assignment to an expert elsewhere
  group_sizes_G: jax.Array  # rows per expert, padding included (multiples of `align`)


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
  source_P = jnp.full(p, t, jnp.int32).at[row_M].set(order_M // k, mode="drop")
  return ExpertLayout(source_P, dest_M.reshape(t, k), padded_G)
