"""Where each (token, expert) assignment goes in a row layout grouped by expert, each group padded to `align` rows."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class ExpertLayout(NamedTuple):
  source_P: jax.Array  # token feeding each row; T (out of range) for padding rows
  dest_TxK: jax.Array  # row of each assignment
  group_sizes_G: jax.Array  # rows per expert, padding included (multiples of `align`)


def padded_rows(num_assignments: int, num_experts: int, align: int) -> int:
  """A static bound on the padded row count: sum_e ceil(n_e / align) <= ceil(M / align) + E - 1, and <= M + E(align-1)."""
  tiles = -(-num_assignments // align) + num_experts - 1
  return align * min(tiles, -(-(num_assignments + num_experts * (align - 1)) // align))


def expert_layout(ids_TxK: jax.Array, num_experts: int, align: int) -> ExpertLayout:
  t, k = ids_TxK.shape
  ids_M = ids_TxK.reshape(-1).astype(jnp.int32)
  order_M = jnp.argsort(ids_M, stable=True)  # sorted position -> assignment
  sizes_G = jnp.bincount(ids_M, length=num_experts).astype(jnp.int32)
  padded_G = (sizes_G + align - 1) // align * align
  shift_G = (jnp.cumsum(padded_G) - padded_G) - (jnp.cumsum(sizes_G) - sizes_G)  # padded start - packed start
  row_M = jnp.arange(t * k, dtype=jnp.int32) + shift_G[ids_M[order_M]]
  dest_M = jnp.zeros(t * k, jnp.int32).at[order_M].set(row_M)
  source_P = jnp.full(padded_rows(t * k, num_experts, align), t, jnp.int32).at[row_M].set(order_M // k)
  return ExpertLayout(source_P, dest_M.reshape(t, k), padded_G)
