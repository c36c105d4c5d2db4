"""Grouped matmul over expert-aligned row tiles: our own Mosaic GPU kernels for Hopper, with their VJP.

    tiled_matmul(lhs_PxK, rhs_GxKxN, group_sizes_G) -> out_PxN
    tiled_swiglu_hidden(lhs_PxK, gate_GxKxN, up_GxKxN, group_sizes_G) -> silu(lhs @ gate) * (lhs @ up)

Rows come grouped by expert and every group size is a multiple of ALIGN, so no tile of rows spans two experts and
each tile reads one expert's weights, found in a per-tile table. Rows past sum(group_sizes) come out as zeros.

- forward (and the input gradient, with the weights read transposed): a persistent kernel, one block per
  multiprocessor, loops over (row tile, column tile); a memory warpgroup streams operands into shared memory (TMA)
  while two compute warpgroups run wgmma. Tiles past the last group run zero pipeline steps and store zeros.
  Given two weight stacks (the SwiGLU's gate and up), one kernel makes both products: each lhs tile is loaded
  once, each warpgroup keeps one accumulator per stack, and it also stores silu(gate) * up, computed from the
  fp32 accumulators (gate and up are kept for the backward).
- weight gradient dW_e = X_e^T dY_e: the same pipeline over each expert's own rows only; an expert with no rows
  runs zero steps and gets an exact zero. ESFT freezes most experts: `weight_grad_groups` names the ones whose
  gradient is needed, and the others' tiles are skipped, neither computed nor written (unread by the caller).
  Under expert parallelism rhs holds one device's experts, the first of them global expert `first_group` (traced:
  the device's index), and `weight_grad_groups` names global experts, static for every device alike.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

ALIGN = 128  # every group's row count is a multiple of this
_SMEM_BYTES = 227 * 1024  # shared memory one Hopper block may use
_MEMORY_REGISTERS = 40  # registers per thread left to the memory warpgroup
_INTERPRET_SMS = 2  # blocks in interpret mode (CPU tests)


@dataclasses.dataclass(frozen=True)
class TileConfig:
  """A block's output tile: two compute warpgroups of tile_m x tile_n each, stacked along `split` ("m" or "n")."""

  tile_m: int
  tile_n: int
  split: str
  tile_k: int = 64
  max_stages: int = 4
  grid_tile_width: int = 4
  delay_release: int = 1  # wgmma groups left in flight while the next step's operands are awaited

  @property
  def block_m(self) -> int:
    return self.tile_m * (2 if self.split == "m" else 1)

  @property
  def block_n(self) -> int:
    return self.tile_n * (2 if self.split == "n" else 1)

  def stages(self, itemsize: int, outputs: int = 1) -> int:
    """Pipeline depth that fits shared memory beside the output staging buffers, for `outputs` products that share
    the lhs tile (each with its own rhs tile)."""
    stage_bytes = (self.block_m + outputs * self.block_n) * self.tile_k * itemsize
    out_bytes = 2 * outputs * self.tile_m * self.tile_n * itemsize
    return min(self.max_stages, (_SMEM_BYTES - out_bytes - 4096) // stage_bytes)


def forward_config(n: int) -> TileConfig:
  """Tiles of the forward / input-gradient kernel for output width n: 128 x 256 blocks where n allows, else
  128 x 128. (BENCHMARKS.md: kernel by kernel, 64 x 256 per warpgroup looked faster for width 2048, but in one run
  side by side the whole SwiGLU at 65k rows was slower with it: 499 against 526 TFLOP/s forward and backward.)"""
  return TileConfig(128, 128, "n") if n % 256 == 0 else TileConfig(64, 128, "m")


# Tiles of the forward kernel with two weight stacks (gate and up): each warpgroup holds one 64 x 128 accumulator
# per stack, so the block's lhs tile is loaded once for both.
SHARED_LHS_TILES = TileConfig(64, 128, "m")


def weight_grad_config(k: int, n: int) -> TileConfig:
  """Tiles of the weight-gradient kernel for a [k, n] weight: 128 x 256 or 256 x 128 blocks where they divide it."""
  if n % 256 == 0:
    return TileConfig(128, 128, "n", grid_tile_width=1)
  if k % 256 == 0:
    return TileConfig(128, 128, "m", grid_tile_width=1)
  return TileConfig(64, 128, "m")


def supported(k: int, n: int, dtype) -> bool:
  """Whether tiled_matmul runs a [*, k] x [k, n] product (forward and both gradients) on its own kernels."""
  return k % 128 == 0 and n % 128 == 0 and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)


def _swizzled(minor_elems: int, dtype) -> tuple:
  bits = jnp.dtype(dtype).itemsize * 8
  swizzle = plgpu.find_swizzle(minor_elems * bits)
  return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def _launch(body, out_type, interpret: bool):
  if interpret:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # no public name yet

    num_sms, mode = _INTERPRET_SMS, InterpretGPUParams()
  else:
    num_sms, mode = jax.devices()[0].core_count, None
  return plgpu.kernel(
    body,
    out_type=out_type,
    grid=(num_sms,),
    grid_names=("sm",),
    num_threads=3,
    thread_name="wg",
    compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    interpret=mode,
  )


def _wg_slice(cfg: TileConfig, wg, dim: str):
  """The part of the block's tile (along `dim`) that compute warpgroup `wg` owns."""
  size = cfg.tile_m if dim == "m" else cfg.tile_n
  return pl.ds(wg * size, size) if cfg.split == dim else slice(None)


def _tile_runner(cfg: TileConfig, dtype, make_specs, mma, outputs: int = 1, swiglu: bool = False):
  """Returns run(steps, offset, a_src, b_srcs, out_dsts, out_smem, allocations), which accumulates one block's
  output tiles (one per rhs in b_srcs, all sharing the lhs a_src) over `steps` operand blocks (from block `offset`
  on) and stores them to out_dsts, and the allocations that run needs for operands shaped like (a_src, b_srcs).
  `swiglu` (two rhs, gate and up): out_dsts has a third, for silu(gate) * up from the fp32 accumulators."""
  stages = cfg.stages(jnp.dtype(dtype).itemsize, outputs)

  def build(body, context, steps, offset):
    return plgpu.emit_pipeline_warp_specialized(
      body,
      grid=(steps,),
      memory_registers=_MEMORY_REGISTERS,
      in_specs=make_specs(offset),
      wg_axis="wg",
      num_compute_wgs=2,
      max_concurrent_steps=stages,
      compute_context=context,
    )

  def run(steps, offset, a_src, b_srcs, out_dsts, out_smem, allocations):
    wg = lax.axis_index("wg")

    def context(pipeline):
      def store(**accs):
        refs = tuple(accs[f"acc{i}"] for i in range(outputs))
        pipeline(refs)
        values = [acc[...] for acc in refs]
        tile = lambda out_dst: out_dst.at[_wg_slice(cfg, wg, "m"), _wg_slice(cfg, wg, "n")]
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's stores have left out_smem
        for i, value in enumerate(values):
          out_smem[wg, i] = value.astype(dtype)
        plgpu.commit_smem()
        for i in range(outputs):
          plgpu.copy_smem_to_gmem(out_smem.at[wg, i], tile(out_dsts[i]))
        if swiglu:  # into the gate's buffer once its copy has read it (copies finish in order)
          gate, up = values
          hidden = gate / (1.0 + jnp.exp(-gate)) * up
          plgpu.wait_smem_to_gmem(outputs - 1, wait_read_only=True)
          out_smem[wg, 0] = hidden.astype(dtype)
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(out_smem.at[wg, 0], tile(out_dsts[outputs]))

      pl.run_scoped(store, **{f"acc{i}": plgpu.ACC((cfg.tile_m, cfg.tile_n), jnp.float32) for i in range(outputs)})

    def body(_, a_smem, *rest):
      *b_smems, accs = rest
      for acc, b_smem in zip(accs, b_smems):
        plgpu.wgmma(acc, *mma(wg, a_smem, b_smem))
      plgpu.wgmma_wait(cfg.delay_release * outputs)  # each wgmma is a group of its own
      return accs

    build(body, context, steps, offset)(a_src, *b_srcs, allocations=allocations)

  def ignore(*_, **__):
    return None

  def allocations(a_src, b_srcs):
    return build(ignore, ignore, jnp.int32(1), 0).get_allocations(a_src, *b_srcs)

  return run, allocations


def _out_smem(cfg: TileConfig, dtype, outputs: int = 1):
  return plgpu.SMEM((2, outputs, cfg.tile_m, cfg.tile_n), dtype, transforms=_swizzled(cfg.tile_n, dtype))


# Each kernel launch is a jitted function of its shapes and tiles: every layer of a model calls the same few, and a
# jitted call's trace and lowering are reused, so each distinct kernel is lowered once per program rather than once
# per layer (in Pallas' interpreter a chain of 16 forward kernels lowered in 0.05 s instead of 0.92 s).
@functools.partial(jax.jit, static_argnames=("transpose_rhs", "cfg", "interpret", "swiglu"))
def grouped_forward(lhs_PxK, rhs, group_sizes_G, *, transpose_rhs: bool, cfg: TileConfig, interpret: bool = False,
                    swiglu: bool = False):
  """out[r] = lhs[r] @ rhs[g(r)] (rhs [G, K, N]), or lhs[r] @ rhs[g(r)].T (rhs [G, N, K], transpose_rhs). `rhs`
  may be a tuple of stacks (not transposed; gate and up): then a tuple of products, each lhs tile loaded once;
  with `swiglu` (gate and up), a third output, silu(gate) * up, computed before the products are rounded."""
  stacks = rhs if isinstance(rhs, tuple) else (rhs,)
  if swiglu and len(stacks) != 2:
    raise ValueError(f"swiglu needs two weight stacks (gate, up), got {len(stacks)}")
  p, k = lhs_PxK.shape
  g, n = stacks[0].shape[0], stacks[0].shape[1 if transpose_rhs else 2]
  dtype = lhs_PxK.dtype
  m_iters, n_iters, k_iters = p // cfg.block_m, n // cfg.block_n, k // cfg.tile_k
  tile_ends_G = jnp.cumsum(group_sizes_G.astype(jnp.int32)) // cfg.block_m
  tile_M = jnp.arange(m_iters, dtype=jnp.int32)
  tile_group_M = jnp.minimum(jnp.searchsorted(tile_ends_G, tile_M, side="right"), g - 1).astype(jnp.int32)
  tile_steps_M = jnp.where(tile_M < tile_ends_G[-1], k_iters, 0).astype(jnp.int32)
  transforms = _swizzled(cfg.tile_k, dtype)

  def make_specs(_):
    spec = functools.partial(plgpu.BlockSpec, transforms=transforms, delay_release=cfg.delay_release)
    a_spec = spec((cfg.block_m, cfg.tile_k), lambda kk: (0, kk))
    if transpose_rhs:
      return [a_spec, spec((cfg.block_n, cfg.tile_k), lambda kk: (0, kk))]
    return [a_spec] + [spec((cfg.tile_k, cfg.block_n), lambda kk: (kk, 0)) for _ in stacks]

  def mma(wg, a_smem, b_smem):
    if transpose_rhs:
      b = b_smem.at[_wg_slice(cfg, wg, "n"), :].transpose((1, 0))
    else:
      b = b_smem.at[:, _wg_slice(cfg, wg, "n")]
    return a_smem.at[_wg_slice(cfg, wg, "m")], b

  run, allocations = _tile_runner(cfg, dtype, make_specs, mma, len(stacks), swiglu)

  def body(tile_group_gmem, tile_steps_gmem, a_gmem, *refs):
    b_gmems, out_gmems = refs[:len(stacks)], refs[len(stacks):]

    @functools.partial(
      pl.run_scoped,
      pipeline_allocs=allocations(a_gmem, tuple(b.at[0] for b in b_gmems)),
      out_smem=_out_smem(cfg, dtype, len(stacks)),
      collective_axes="wg",
    )
    def _(pipeline_allocs, out_smem):
      @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
      def _(info):
        mi, ni = plgpu.planar_snake(info.index[0], (m_iters, n_iters), 1, cfg.grid_tile_width)
        rows, cols = pl.ds(mi * cfg.block_m, cfg.block_m), pl.ds(ni * cfg.block_n, cfg.block_n)
        weights = [b.at[tile_group_gmem[mi]] for b in b_gmems]
        b_srcs = tuple(w.at[cols, :] if transpose_rhs else w.at[:, cols] for w in weights)
        run(tile_steps_gmem[mi], 0, a_gmem.at[rows, :], b_srcs, tuple(o.at[rows, cols] for o in out_gmems),
            out_smem, pipeline_allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  out_type = tuple(jax.ShapeDtypeStruct((p, n), dtype) for _ in range(len(stacks) + swiglu))
  outs = _launch(body, out_type, interpret)(tile_group_M, tile_steps_M, lhs_PxK, *stacks)
  return tuple(outs) if isinstance(rhs, tuple) else outs[0]


def weight_grad_steps(group_sizes_G: jax.Array, tile_k: int, groups: tuple[int, ...] | None,
                      first_group: jax.Array | int = 0) -> jax.Array:
  """Pipeline steps of each expert's weight-gradient tiles: its rows / tile_k; -1 for experts outside `groups`
  (global ids; group g is expert first_group + g), whose tiles are neither computed nor written."""
  steps_G = group_sizes_G.astype(jnp.int32) // tile_k
  if groups is None:
    return steps_G
  global_G = jnp.arange(steps_G.shape[0], dtype=jnp.int32) + first_group
  wanted_G = jnp.any(global_G[:, None] == jnp.asarray(groups, jnp.int32).reshape(1, -1), axis=1)
  return jnp.where(wanted_G, steps_G, -1)


def grouped_weight_grad(lhs_PxK, rhs_PxN, group_sizes_G, *, cfg: TileConfig, interpret: bool = False,
                        groups: tuple[int, ...] | None = None, first_group: jax.Array | int = 0):
  """out[e] = lhs[rows of e].T @ rhs[rows of e], shape [G, K, N], for the experts in `groups` (default: all;
  global ids, group g being expert first_group + g); zero for such an expert with no rows. The others' entries
  are left unwritten (whatever the buffer held): writing zeros there was 1 GB a layer at DeepSeek-V2-Lite's
  size, for values ESFT never reads."""
  sizes_G = group_sizes_G.astype(jnp.int32)
  start_blocks_G = (jnp.cumsum(sizes_G) - sizes_G) // cfg.tile_k
  steps_G = weight_grad_steps(sizes_G, cfg.tile_k, groups, first_group)
  return _weight_grad_kernel(start_blocks_G, steps_G, lhs_PxK, rhs_PxN, cfg=cfg, interpret=interpret)


# Jitted like grouped_forward; which experts train enters as the traced steps (-1: skip the expert), so layers with
# different ESFT selections share the kernel.
@functools.partial(jax.jit, static_argnames=("cfg", "interpret"))
def _weight_grad_kernel(start_blocks_G, steps_G, lhs_PxK, rhs_PxN, *, cfg: TileConfig, interpret: bool):
  k, n = lhs_PxK.shape[1], rhs_PxN.shape[1]
  g = steps_G.shape[0]
  dtype = lhs_PxK.dtype
  m_iters, n_iters = k // cfg.block_m, n // cfg.block_n
  transforms = _swizzled(cfg.tile_k, dtype)

  def make_specs(offset):
    spec = functools.partial(plgpu.BlockSpec, transforms=transforms, delay_release=cfg.delay_release)
    return [spec((cfg.tile_k, cfg.block_m), lambda kk: (offset + kk, 0)),
            spec((cfg.tile_k, cfg.block_n), lambda kk: (offset + kk, 0))]

  def mma(wg, a_smem, b_smem):
    a = a_smem.at[:, _wg_slice(cfg, wg, "m")].transpose((1, 0))
    return a, b_smem.at[:, _wg_slice(cfg, wg, "n")]

  run, allocations = _tile_runner(cfg, dtype, make_specs, mma)

  def body(start_blocks_gmem, steps_gmem, a_gmem, b_gmem, out_gmem):
    @functools.partial(
      pl.run_scoped,
      pipeline_allocs=allocations(a_gmem, (b_gmem,)),
      out_smem=_out_smem(cfg, dtype),
      collective_axes="wg",
    )
    def _(pipeline_allocs, out_smem):
      @plgpu.nd_loop((g, m_iters * n_iters), collective_axes="sm")
      def _(info):
        gi = info.index[0]
        mi, ni = plgpu.planar_snake(info.index[1], (m_iters, n_iters), 1, cfg.grid_tile_width)
        rows, cols = pl.ds(mi * cfg.block_m, cfg.block_m), pl.ds(ni * cfg.block_n, cfg.block_n)
        steps = steps_gmem[gi]

        @pl.when(steps >= 0)
        def _():
          run(steps, start_blocks_gmem[gi], a_gmem.at[:, rows], (b_gmem.at[:, cols],),
              (out_gmem.at[gi, rows, cols],), out_smem, pipeline_allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  out_type = jax.ShapeDtypeStruct((g, k, n), dtype)
  return _launch(body, out_type, interpret)(start_blocks_G, steps_G, lhs_PxK, rhs_PxN)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def tiled_matmul(lhs_PxK, rhs_GxKxN, group_sizes_G, interpret: bool = False,
                 weight_grad_groups: tuple[int, ...] | None = None, first_group: jax.Array | int = 0):
  """out[r] = lhs[r] @ rhs[g(r)] for rows grouped by expert, each group a multiple of ALIGN rows; zeros past them.
  The gradient of rhs is computed only for the groups in `weight_grad_groups` (default: all; global ids, rhs[g]
  being expert first_group + g) and left unwritten elsewhere: read only the groups named."""
  cfg = forward_config(rhs_GxKxN.shape[2])
  return grouped_forward(lhs_PxK, rhs_GxKxN, group_sizes_G, transpose_rhs=False, cfg=cfg, interpret=interpret)


def _tiled_matmul_fwd(lhs_PxK, rhs_GxKxN, group_sizes_G, interpret, weight_grad_groups, first_group):
  out = tiled_matmul(lhs_PxK, rhs_GxKxN, group_sizes_G, interpret, weight_grad_groups, first_group)
  return out, (lhs_PxK, rhs_GxKxN, group_sizes_G, first_group)


def _tiled_matmul_bwd(interpret, weight_grad_groups, residuals, dout_PxN):
  lhs_PxK, rhs_GxKxN, group_sizes_G, first_group = residuals
  dlhs_PxK, (drhs_GxKxN,) = _products_grads(lhs_PxK, (rhs_GxKxN,), (dout_PxN,), group_sizes_G, interpret,
                                            weight_grad_groups, first_group)
  return dlhs_PxK, drhs_GxKxN, None, None


tiled_matmul.defvjp(_tiled_matmul_fwd, _tiled_matmul_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def tiled_swiglu_hidden(lhs_PxK, gate_GxKxN, up_GxKxN, group_sizes_G, interpret: bool = False,
                        weight_grad_groups: tuple[int, ...] | None = None, first_group: jax.Array | int = 0):
  """silu(lhs[r] @ gate[g(r)]) * (lhs[r] @ up[g(r)]), rows as in `tiled_matmul`: one kernel loads each lhs tile
  once for both products and applies the SiLU to its fp32 accumulators. Weight gradients as in `tiled_matmul`."""
  return _tiled_swiglu_hidden_fwd(lhs_PxK, gate_GxKxN, up_GxKxN, group_sizes_G, interpret, weight_grad_groups,
                                  first_group)[0]


def _tiled_swiglu_hidden_fwd(lhs_PxK, gate_GxKxN, up_GxKxN, group_sizes_G, interpret, weight_grad_groups,
                             first_group):
  gate_PxN, up_PxN, hidden_PxN = grouped_forward(lhs_PxK, (gate_GxKxN, up_GxKxN), group_sizes_G, transpose_rhs=False,
                                                 cfg=SHARED_LHS_TILES, interpret=interpret, swiglu=True)
  return hidden_PxN, (lhs_PxK, gate_GxKxN, up_GxKxN, group_sizes_G, first_group, gate_PxN, up_PxN)


def _tiled_swiglu_hidden_bwd(interpret, weight_grad_groups, residuals, dhidden_PxN):
  lhs_PxK, gate_GxKxN, up_GxKxN, group_sizes_G, first_group, gate_PxN, up_PxN = residuals
  gate, up, dhidden = (a.astype(jnp.float32) for a in (gate_PxN, up_PxN, dhidden_PxN))
  sigmoid = jax.nn.sigmoid(gate)
  dgate = (dhidden * up * sigmoid * (1 + gate * (1 - sigmoid))).astype(lhs_PxK.dtype)
  dup = (dhidden * gate * sigmoid).astype(lhs_PxK.dtype)
  dlhs_PxK, (dgate_GxKxN, dup_GxKxN) = _products_grads(lhs_PxK, (gate_GxKxN, up_GxKxN), (dgate, dup), group_sizes_G,
                                                       interpret, weight_grad_groups, first_group)
  return dlhs_PxK, dgate_GxKxN, dup_GxKxN, None, None


tiled_swiglu_hidden.defvjp(_tiled_swiglu_hidden_fwd, _tiled_swiglu_hidden_bwd)


def _products_grads(lhs_PxK, stacks, douts, group_sizes_G, interpret, weight_grad_groups, first_group):
  """The gradients of the products lhs @ stacks[i] given theirs (douts): lhs's (summed over the products) and each
  stack's (see `tiled_matmul`)."""
  dlhs_PxK, dstacks = None, []
  for rhs_GxKxN, dout_PxN in zip(stacks, douts):
    _, k, n = rhs_GxKxN.shape
    dout_PxN = dout_PxN.astype(lhs_PxK.dtype)
    dx_PxK = grouped_forward(
      dout_PxN, rhs_GxKxN, group_sizes_G, transpose_rhs=True, cfg=forward_config(k), interpret=interpret
    )
    dlhs_PxK = dx_PxK if dlhs_PxK is None else dlhs_PxK + dx_PxK
    if weight_grad_groups == ():  # nothing trains in this layer
      dstacks.append(jnp.zeros_like(rhs_GxKxN))
    else:
      dstacks.append(grouped_weight_grad(lhs_PxK, dout_PxN, group_sizes_G, cfg=weight_grad_config(k, n),
                                         interpret=interpret, groups=weight_grad_groups, first_group=first_group))
  return dlhs_PxK, tuple(dstacks)
