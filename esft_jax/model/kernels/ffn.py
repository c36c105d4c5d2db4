"""The routed-expert SwiGLU on the GPU kernels: dispatch rows into an expert-grouped layout, three grouped matmuls,
combine. Same function as `esft_jax.model.experts.expert_ffn`, dropless."""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from esft_jax.model.kernels import hopper_available, tiled
from esft_jax.model.kernels.layout import combine, dispatch, expert_layout

KERNELS = ("tiled", "ragged")


def kernel_matmul(kernel: str, interpret: bool = False) -> tuple[Callable, int]:
  """The grouped matmul (lhs, rhs, group_sizes, weight_grad_groups=None, first_group=0) -> out of a kernel family,
  and the row alignment it needs. `rhs` is a stack [G, K, N] or a tuple of stacks (gate and up: a tuple of
  products, which "tiled" makes in one pass over lhs). Rows past sum(group_sizes) come out as zeros.
  `weight_grad_groups` names the experts whose weight gradient the caller uses (None: all; global ids, rhs[g]
  being expert first_group + g); the "tiled" kernels skip the others' (left unwritten), the rest compute every
  one."""
  if kernel == "tiled":
    supported, align = tiled.supported, tiled.ALIGN
    fast = lambda a, b, g, w, first: tiled.tiled_matmul(a, b, g, interpret, w, first)
  elif kernel == "ragged":
    from esft_jax.model.kernels import ragged  # imports jax's kernels, which import jax's test utilities

    supported, align = ragged.supported, 1
    # jax's kernels need sum(group_sizes) = rows: the rows past the groups (padding, zeros) join the last group,
    # exact but computed; under expert parallelism that is every other device's assignments, so prefer "tiled".
    one = lambda a, b, g: ragged.ragged_matmul(a, b, g.at[-1].add(a.shape[0] - jnp.sum(g)))
    fast = lambda a, b, g, *_: tuple(one(a, s, g) for s in b) if isinstance(b, tuple) else one(a, b, g)
  else:
    raise ValueError(f"GPU kernel {kernel!r} is unknown; use one of {KERNELS}")

  def matmul(lhs_PxK, rhs, group_sizes_G, weight_grad_groups=None, first_group=0):
    first = rhs[0] if isinstance(rhs, tuple) else rhs
    if supported(first.shape[1], first.shape[2], lhs_PxK.dtype) and lhs_PxK.dtype == first.dtype:
      return fast(lhs_PxK, rhs, group_sizes_G, weight_grad_groups, first_group)
    if isinstance(rhs, tuple):  # widths the kernels don't tile
      return tuple(jax.lax.ragged_dot(lhs_PxK, stack, group_sizes_G) for stack in rhs)
    return jax.lax.ragged_dot(lhs_PxK, rhs, group_sizes_G)

  return matmul, align


def gpu_expert_ffn(
  x_TxD: jax.Array,
  ids_TxK: jax.Array,
  weights_TxK: jax.Array,
  experts: Mapping[str, jax.Array],
  kernel: str = "tiled",
  interpret: bool = False,
  weight_grad_experts: tuple[int, ...] | None = None,
  first_expert: jax.Array | int = 0,
) -> jax.Array:
  """Each token's sum over its K experts of weight * SwiGLU_e(x), on the grouped-matmul kernels of `kernel`.
  `interpret` runs the "tiled" kernels in Pallas' GPU interpreter (CPU tests). `ids_TxK` index `experts`; ids
  outside them (expert parallelism: experts on other devices) get no row and contribute nothing.
  `weight_grad_experts` (global ids, experts[e] being expert first_expert + e): see
  `esft_jax.model.experts.expert_ffn`."""
  if not (interpret or hopper_available()):
    raise ValueError(f"the GPU expert kernels need a Hopper GPU, found {jax.devices()[0]}; use impl='auto'")
  matmul, align = kernel_matmul(kernel, interpret)
  layout = expert_layout(ids_TxK, experts["gate_proj"].shape[0], align)
  x_PxD = dispatch(x_TxD, layout)
  groups = (layout.group_sizes_G, weight_grad_experts, first_expert)
  gate_PxF, up_PxF = matmul(x_PxD, (experts["gate_proj"], experts["up_proj"]), *groups)
  y_PxD = matmul(jax.nn.silu(gate_PxF) * up_PxF, experts["down_proj"], *groups)
  y_TxKxD = combine(y_PxD, layout)
  return jnp.sum(y_TxKxD * weights_TxK[..., None].astype(y_TxKxD.dtype), axis=1)
