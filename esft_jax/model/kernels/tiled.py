"""Grouped matmul over expert-aligned row tiles: our own Mosaic GPU kernels for Hopper, with their VJP.

    tiled_matmul(lhs_PxK, rhs_GxKxN, group_sizes_G) -> out_PxN
    tiled_swiglu(x_PxD, gate_GxDxF, up_GxDxF, down_GxFxD, group_sizes_G) -> (silu(x @ gate) * (x @ up)) @ down

Rows come grouped by expert and every group size is a multiple of ALIGN (64). Each group's rows are cut into row
tiles of its own, so a tile reads one expert's weights, found in per-tile tables; a group's last tile may hold only
its top 64 rows, and then computes and stores those alone. Rows past sum(group_sizes) are left unwritten: the
layout's static row bound leaves a fifth of the rows there at 16k rows, and no caller reads them.

- forward (and the input gradient, with the weights read transposed): a persistent kernel, one block per
  multiprocessor, loops over (row tile, column tile); a memory warpgroup streams operands into shared memory (TMA)
  while two compute warpgroups run wgmma. One ring of stages serves all the block's tiles, so the next tile's first
  operands load while the compute warpgroups store the last one. Tiles past the last group are skipped. On the GPU
  the last column tile may run past the output width (zero-filled loads, dropped stores).
  Either both compute warpgroups share each block (each one half of it), or in a ping-pong schedule each takes
  whole blocks in turn, so that one's epilogue overlaps the other's mainloop.
  Given two weight stacks (the SwiGLU's gate and up), one kernel makes both products: each lhs tile is loaded
  once and each warpgroup keeps one accumulator per stack. Given two lhs terms beside them (the SwiGLU's dgate and
  dup), one kernel sums both products in one accumulator, taking the terms' K blocks in turn.
- epilogues: what a kernel stores is computed from its fp32 accumulators, and from tiles of other arrays at the
  same place, loaded while the products accumulate: the SwiGLU's hidden silu(gate) * up beside its partial
  derivatives in gate and up; in the backward, dgate and dup as the hidden's gradient times those.
  Each saves an elementwise pass over [P, F] or [P, D] arrays.
- weight gradient dW_e = X_e^T dY_e: the same pipeline over each expert's own rows only; an expert with no rows
  runs zero steps and gets an exact zero. ESFT freezes most experts: `trained_experts` names the ones whose
  gradient is needed, and the others' tiles are skipped, neither computed nor written (unread by the caller).
  Under expert parallelism rhs holds one device's experts, the first of them global expert `first_group` (traced:
  the device's index), and `trained_experts` names global experts, static for every device alike.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from esft_jax.model.kernels.mosaic import launch

HALF_TILE_ROWS = 64  # M of one wgmma instruction
# Every group's row count is a multiple of this. A row tile of 128 never spans two groups: a group's last tile may
# hold only its top 64 rows (the height of one wgmma), and then computes and stores those alone. Groups padded to 64
# rather than 128 rows compute fewer padding rows where routing leaves many experts few rows (BENCHMARKS.md, kernel
# choices); in blocks split by rows between the two compute warpgroups, a half tile leaves the lower one idle.
ALIGN = HALF_TILE_ROWS
_SMEM_BYTES = 227 * 1024  # shared memory one Hopper block may use
_MEMORY_REGISTERS = 40  # registers per thread left to the memory warpgroup
# each compute warpgroup's share: the 64k registers are 512 per thread of one warpgroup, in multiples of 8
_COMPUTE_REGISTERS = (512 - _MEMORY_REGISTERS) // 2 // 8 * 8


@dataclasses.dataclass(frozen=True)
class TileConfig:
  """A block's output tile: two compute warpgroups of tile_m x tile_n each, stacked along `split` ("m" or "n"); or
  with split "pingpong", a warpgroup's own tile_m x tile_n block, the two warpgroups taking the block's tiles in turn:
  the memory warpgroup loads one tile's operands after the other's, so one warpgroup's mainloop runs while the
  other's epilogue stores, and the tensor cores are not left idle during epilogues (CUTLASS's ping-pong schedule)."""

  tile_m: int
  tile_n: int
  split: str
  tile_k: int = 64
  max_stages: int = 4
  # A persistent kernel visits output tiles in bands of this many column tiles (plgpu.planar_snake). 16 is wider
  # than any output here (11 column tiles of width 1408, 8 of 2048), so each row tile's columns come one after
  # another: each lhs row tile is read from HBM once, and the weights of the experts in flight stay in L2
  # (narrower bands run slower: BENCHMARKS.md, kernel choices).
  grid_tile_width: int = 16
  delay_release: int = 1  # wgmma groups left in flight while the next step's operands are awaited
  # Output staging: None holds each slot (side array or output) as a whole warpgroup tile; a width stages the tile
  # in pieces of that many columns, through a ring of two sets of slots per warpgroup: one piece's sides load while
  # the other's outputs leave. That leaves shared memory for more pipeline stages (e.g. 4 instead of 3 with 48 KB
  # stages), or for 128 x 256 blocks whose epilogue reads two side arrays.
  store_n: int | None = None

  def __post_init__(self):
    if self.split not in ("m", "n", "pingpong"):
      raise ValueError(f"TileConfig: split={self.split!r} must be 'm' (warpgroups stacked along rows), 'n' or "
                       "'pingpong' (each warpgroup its own blocks, in turn)")
    if self.store_n is not None and (self.store_n <= 0 or self.tile_n % self.store_n):
      raise ValueError(f"TileConfig: store_n={self.store_n} must divide tile_n={self.tile_n}")

  def __str__(self) -> str:
    """Short name for tables and test ids, e.g. 64x256m-store64 (fields at their defaults left out)."""
    short = {"tile_k": "k", "max_stages": "stages", "grid_tile_width": "width", "delay_release": "delay",
             "store_n": "store"}
    defaults = {field.name: field.default for field in dataclasses.fields(self)}
    name = f"{self.tile_m}x{self.tile_n}{self.split}"
    for field, label in short.items():
      if getattr(self, field) != defaults[field]:
        name += f"-{label}{getattr(self, field)}"
    return name

  @property
  def block_m(self) -> int:
    return self.tile_m * (2 if self.split == "m" else 1)

  @property
  def block_n(self) -> int:
    return self.tile_n * (2 if self.split == "n" else 1)

  def staging(self, slots: int) -> tuple[int, int]:
    """(buffers, columns of each) of a warpgroup's output staging, for an epilogue of `slots` slots."""
    return (2 * slots, self.store_n) if self.store_n else (slots, self.tile_n)

  def stages(self, itemsize: int, products: int = 1, slots: int = 1) -> int:
    """Pipeline depth that fits shared memory beside the output staging (`staging(slots)`), for `products` that
    share the lhs tile (each with its own rhs tile)."""
    stage_bytes = (self.block_m + products * self.block_n) * self.tile_k * itemsize
    buffers, columns = self.staging(slots)
    out_bytes = 2 * buffers * self.tile_m * columns * itemsize
    return min(self.max_stages, (_SMEM_BYTES - out_bytes - 4096) // stage_bytes)


def forward_config(epilogue: str = "products") -> TileConfig:
  """Tiles of the forward / input-gradient kernels for `epilogue`: ping-pong blocks of 128 x 128 (each compute
  warpgroup its own, in turn), outputs and side arrays staged in pieces of 32 columns (16 for swiglu_grad's two side
  arrays), leaving room for 5 pipeline stages. 128 divides every width the kernels take (`supported`), so no tile runs
  past it. One warpgroup's epilogue overlaps the other's mainloop, so against the best tiling whose blocks both
  warpgroups share these run about as fast kernel by kernel, and faster where the epilogue is heavy (BENCHMARKS.md,
  kernel choices)."""
  return TileConfig(128, 128, "pingpong", store_n=16 if _epilogue(epilogue).sides > 1 else 32, max_stages=8)


# Tiles of the forward kernel with two weight stacks (gate and up): each warpgroup holds one 64 x 128 accumulator
# per stack, so the block's lhs tile is loaded once for both.
SHARED_LHS_TILES = TileConfig(64, 128, "m")


# Tiles of x's input gradient in the SwiGLU's backward, dgate @ gate.T + dup @ up.T: two terms of F / 64 K blocks
# each. Over such a long mainloop the epilogue weighs little, and 128 x 256 blocks shared by both warpgroups (fewer
# operand bytes per flop) run faster than forward_config's ping-pong ones (BENCHMARKS.md, kernel choices).
SUM_OF_TERMS_TILES = TileConfig(128, 128, "n", store_n=16)


# Tiles of the weight-gradient kernel: ping-pong blocks of 128 x 128 as forward_config's. Against 128 x 256 blocks
# shared by both warpgroups they are faster, most at 16k rows, where each expert's tiles take only 4 steps of K and
# the epilogue weighs most (BENCHMARKS.md, kernel choices).
WEIGHT_GRAD_TILES = TileConfig(128, 128, "pingpong", grid_tile_width=1, store_n=32, max_stages=8)


DTYPES = (jnp.bfloat16, jnp.float16)  # what wgmma multiplies here


def supported(k: int, n: int, dtype) -> bool:
  """Whether a [*, k] x [k, n] product (forward and both gradients) runs on the grouped-matmul kernels, ours and
  jax's (`ragged`) alike: whole 128-wide tiles of a 16-bit dtype."""
  return k % 128 == 0 and n % 128 == 0 and jnp.dtype(dtype) in DTYPES


def _check_dtypes(kernel: str, *operands) -> None:
  """The kernels stage every operand with one swizzle, so all must share one 16-bit dtype."""
  dtypes = [jnp.dtype(x.dtype) for x in operands]
  if len(set(dtypes)) > 1 or dtypes[0] not in DTYPES:
    raise ValueError(f"{kernel}: operands must all be bfloat16 or all float16, got {[d.name for d in dtypes]}; cast "
                     "them (e.g. .astype(jnp.bfloat16)) before the call")


def _swizzled(minor_elems: int, dtype) -> tuple:
  bits = jnp.dtype(dtype).itemsize * 8
  swizzle = plgpu.find_swizzle(minor_elems * bits)
  return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def _wg_slice(cfg: TileConfig, wg, dim: str):
  """The part of the block's tile (along `dim`) that compute warpgroup `wg` owns (in ping-pong: all of it)."""
  size = cfg.tile_m if dim == "m" else cfg.tile_n
  return pl.ds(wg * size, size) if cfg.split == dim else slice(None)


def _sigmoid(x):
  # 1 / (1 + e^-x) as rsqrt(1 + e^-x)^2: with the kernels' approximate math, exp and rsqrt are one fast instruction
  # each, and a division is not (relative error ~1e-6, far below bf16's rounding).
  r = lax.rsqrt(1.0 + jnp.exp(-x))
  return r * r


def _swiglu(values, _):
  # hidden = silu(gate) * up, stored with its partial derivatives (all the backward needs of gate and up), so that
  # the epilogue of the hidden's input-gradient kernel is two products per element rather than the SiLU's exp and
  # rsqrt again: the forward computes them anyway.
  gate, up = values
  sigmoid = _sigmoid(gate)
  silu = gate * sigmoid
  return [up * sigmoid * (1.0 + gate * (1.0 - sigmoid)), silu, silu * up]


def _swiglu_grad(values, sides):
  (dhidden,), (dhidden_dgate, dhidden_dup) = values, [side.astype(jnp.float32) for side in sides]
  return [dhidden * dhidden_dgate, dhidden * dhidden_dup]


class Epilogue(NamedTuple):
  """What a kernel stores, computed from its fp32 products and from `sides` tiles (of other [P, N] arrays, at the
  output tile's place, loaded while the products accumulate)."""

  sides: int
  outputs: int | None  # None: one per product
  fn: Callable  # (products, sides) -> outputs


EPILOGUES = {
  "products": Epilogue(0, None, lambda values, _: values),
  # products gate, up -> d hidden / d gate, d hidden / d up (= silu(gate)), hidden = silu(gate) * up
  "swiglu": Epilogue(0, 3, _swiglu),
  "swiglu_grad": Epilogue(2, 2, _swiglu_grad),  # product dhidden, sides the two partials -> dgate, dup
}


def _epilogue(name: str) -> Epilogue:
  if name not in EPILOGUES:
    raise ValueError(f"epilogue {name!r} is unknown; use one of {list(EPILOGUES)}")
  return EPILOGUES[name]


def _slots(products: int, epilogue: Epilogue) -> int:
  """Output staging slots per warpgroup and set: one per product or side; more outputs reuse them."""
  return max(products, epilogue.sides)


class TileWork(NamedTuple):
  """One output tile of a persistent kernel, as its memory and compute warpgroups both see it."""

  steps: jax.Array  # K blocks to accumulate; 0: store the epilogue of zero products; < 0: skip the tile
  # (k, r, copy) -> None: calls copy(lhs block, rhs blocks), GMEM refs of the tile's k-th K block, the lhs block
  # holding the r rows the tile holds (static: block_m, or a half tile's top 64)
  operands: Callable
  outs: tuple  # GMEM refs of the tile's columns: the epilogue's outputs
  first_row: jax.Array  # the tile's first row in them
  sides: tuple = ()  # and its side arrays, as outs
  rows: jax.Array | None = None  # rows the tile holds: block_m, or 64 (a group's last half tile); None: block_m


class _Staging(NamedTuple):
  """A persistent kernel's shared-memory plan: `stages` operand blocks in the ring, and each compute warpgroup's
  output staging, `sets` sets of `slots` slots (one per product or side), each slot `columns` wide, the tile's
  columns leaving in `pieces` of that width."""

  stages: int
  slots: int
  sets: int
  pieces: int
  columns: int


def _staging(cfg: TileConfig, dtype, products: int, epilogue: Epilogue) -> _Staging:
  """The deepest pipeline that fits shared memory beside the output staging of `products` and `epilogue`. The
  memory warpgroup reuses a stage once its blocks are released, which the compute warpgroups do delay_release steps
  late: at least one stage more than that keeps the pipeline moving."""
  slots = _slots(products, epilogue)
  stages = cfg.stages(jnp.dtype(dtype).itemsize, products, slots)
  if stages <= cfg.delay_release:  # else the memory warpgroup would wait for a release that never comes
    raise ValueError(f"TileConfig {cfg}: {stages} pipeline stage(s) fit (max_stages={cfg.max_stages}, shared memory "
                     f"beside {slots} output slot(s) per warpgroup), which must exceed delay_release="
                     f"{cfg.delay_release}: stage the outputs in pieces (store_n), use smaller tiles or a smaller "
                     "delay_release")
  buffers, columns = cfg.staging(slots)
  return _Staging(stages, slots, buffers // slots, cfg.tile_n // columns, columns)


def _scratch(cfg: TileConfig, staging: _Staging, dtype, a_block: tuple, b_block: tuple, products: int,
             epilogue: Epilogue) -> dict:
  """The block's shared memory and barriers, by the names `_run_tiles`' kernel takes: the operand rings (one lhs,
  `products` rhs), `loaded` (a stage's blocks have arrived) and `consumed` (its wgmmas have read them) per stage,
  each compute warpgroup's output staging, and with side arrays a barrier per compute warpgroup, set of slots and
  side."""
  operand_transforms = _swizzled(cfg.tile_k, dtype)
  pingpong = cfg.split == "pingpong"
  scratch = {
    "a_ring": plgpu.SMEM((staging.stages, *a_block), dtype, transforms=operand_transforms),
    "b_rings": [plgpu.SMEM((staging.stages, *b_block), dtype, transforms=operand_transforms) for _ in range(products)],
    # per stage, and in ping-pong per compute warpgroup too
    "loaded": plgpu.Barrier(num_arrivals=1 + products, num_barriers=staging.stages * (2 if pingpong else 1)),
    # by the step's warpgroups: both, or in ping-pong the tile's own
    "consumed": plgpu.Barrier(num_arrivals=1 if pingpong else 2, num_barriers=staging.stages),
    "out_smem": plgpu.SMEM((2, staging.sets * staging.slots, cfg.tile_m, staging.columns), dtype,
                           transforms=_swizzled(staging.columns, dtype)),
  }
  if epilogue.sides:
    scratch["side_barriers"] = plgpu.Barrier(num_barriers=2 * staging.sets * epilogue.sides)
  return scratch


@dataclasses.dataclass(frozen=True)
class _Block:
  """One block of a persistent tile kernel as warpgroup `wg` sees it (compute warpgroups 0 and 1, memory
  warpgroup 2): the tiles' shape, the shared-memory pipeline and output staging, and where things are in them."""

  cfg: TileConfig
  dtype: Any
  staging: _Staging
  products: int
  epilogue: Epilogue
  wg: jax.Array
  wg_first_row: jax.Array | int  # first row of the warpgroup's part of the block's tile
  a_ring: Any
  b_rings: list
  loaded: Any
  consumed: Any
  out_smem: Any
  side_barriers: Any = None

  @property
  def pingpong(self) -> bool:
    return self.cfg.split == "pingpong"

  def stage_of(self, step):
    return lax.rem(step, self.staging.stages)

  def owner_of(self, local_index):
    """Which set of `loaded` barriers signals the block's local_index-th tile: in ping-pong a set per compute
    warpgroup, the two taking tiles in turn; else one set, both warpgroups taking every tile."""
    return lax.rem(local_index, 2) if self.pingpong else 0

  @property
  def awaited(self):
    """The set of `loaded` barriers warpgroup wg awaits (see owner_of)."""
    return self.wg if self.pingpong else 0

  def loaded_at(self, owner, step):
    return self.loaded.at[owner * self.staging.stages + self.stage_of(step)]

  def await_consumed(self, step):
    plgpu.barrier_wait(self.consumed.at[self.stage_of(step)])

  def release(self, step):
    plgpu.barrier_arrive(self.consumed.at[self.stage_of(step)])

  def for_held_rows(self, work: TileWork, fn: Callable, or_none: bool = False) -> None:
    """fn(r) for the r rows of the tile that warpgroup wg's part holds (static: tile_m, or 64 of a half tile's);
    where it holds none (the lower part of a half tile), fn(0) if or_none, else nothing."""
    if work.rows is None:
      return fn(self.cfg.tile_m)
    held = work.rows - self.wg_first_row  # of the part's tile_m rows: all if >= tile_m, none if <= 0
    pl.when(held >= self.cfg.tile_m)(functools.partial(fn, self.cfg.tile_m))
    if HALF_TILE_ROWS < self.cfg.tile_m:
      pl.when(held == HALF_TILE_ROWS)(functools.partial(fn, HALF_TILE_ROWS))
    if or_none:
      pl.when(held <= 0)(functools.partial(fn, 0))

  def piece_of(self, ref, work: TileWork, r: int, piece: int):
    """GMEM: r rows of warpgroup wg's part of the tile, in the column piece's columns."""
    columns = self.staging.columns
    return ref.at[pl.ds(work.first_row + self.wg_first_row, r), _wg_slice(self.cfg, self.wg, "n")].at[
      :, pl.ds(piece * columns, columns)]

  def slot(self, piece: int, i: int):
    """Slot i of the column piece's set, in warpgroup wg's output staging."""
    return self.out_smem.at[self.wg, (piece % self.staging.sets) * self.staging.slots + i]

  def side_loaded(self, piece: int, i: int):
    """The barrier of side i's tile in the column piece's slots."""
    return self.side_barriers.at[(self.wg * self.staging.sets + piece % self.staging.sets) * self.epilogue.sides + i]


def _load_sides(block: _Block, work: TileWork, piece: int) -> None:
  """Starts copying the side arrays' tiles of one column piece (the rows warpgroup wg holds) into its slots."""

  def load(r):
    for i, side_src in enumerate(work.sides):
      plgpu.copy_gmem_to_smem(block.piece_of(side_src, work, r, piece), block.slot(piece, i).at[pl.ds(0, r)],
                              block.side_loaded(piece, i))

  block.for_held_rows(work, load)


def _load_first_sides(block: _Block, work: TileWork) -> None:
  """Starts the side arrays' first pieces, one per set of slots; the later pieces load in the epilogue."""
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's stores have read the buffers
  for piece in range(min(block.staging.sets, block.staging.pieces)):
    _load_sides(block, work, piece)


def _store_tile(block: _Block, values: list, work: TileWork) -> None:
  """Stores the epilogue of warpgroup wg's fp32 `values`, column piece by piece: each piece's sides (if any) are
  read from its set, while the next piece's load into the other set, then its outputs leave from the same slots."""
  staging, epilogue = block.staging, block.epilogue
  if not epilogue.sides:  # (with side arrays, _load_first_sides has waited)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's stores have read the buffers
  for piece in range(staging.pieces):
    if epilogue.sides and 0 < piece < staging.pieces - 1:
      # The next piece's sides go to the other set once the previous piece's stores have read it.
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      _load_sides(block, work, piece + 1)
    sides = []
    for i in range(epilogue.sides):
      block.for_held_rows(work, lambda _, i=i: plgpu.barrier_wait(block.side_loaded(piece, i)))
      sides.append(block.slot(piece, i)[...])  # (rows not held: whatever the slot held, never stored)
    cols = slice(piece * staging.columns, (piece + 1) * staging.columns)
    _store_piece(block, epilogue.fn([value[:, cols] for value in values], sides), work, piece)


def _store_piece(block: _Block, outs: list, work: TileWork, piece: int) -> None:
  """Copies one column piece's outputs to GMEM through its set's slots; outputs past the set's slots reuse them
  once their copies have read them (copies finish in the order issued)."""
  slots = block.staging.slots
  if block.epilogue.sides:
    plgpu.commit_smem()  # every thread has read the sides before the outputs overwrite them
  elif piece >= block.staging.sets:
    # The stores of this set's last piece (piece - 2) have read it; piece - 1's may still be in flight.
    plgpu.wait_smem_to_gmem(len(outs), wait_read_only=True)
  for first in range(0, len(outs), slots):
    chunk = outs[first:first + slots]
    if first:
      plgpu.wait_smem_to_gmem(slots - len(chunk), wait_read_only=True)
    for i, out in enumerate(chunk):
      block.slot(piece, i)[...] = out.astype(block.dtype)
    plgpu.commit_smem()
    for i in range(len(chunk)):
      block.for_held_rows(work, lambda r, i=i: plgpu.copy_smem_to_gmem(
        block.slot(piece, i).at[pl.ds(0, r)], block.piece_of(work.outs[first + i], work, r, piece)))


def _memory_warpgroup(block: _Block, grid: tuple, work_at: Callable, block_rows: int) -> None:
  """The memory warpgroup: streams every tile's operand blocks, tile after tile, through the one ring of stages,
  each into a stage its blocks' last readers have released. block_rows: the rows of a whole tile's lhs block."""
  plgpu.set_max_registers(_MEMORY_REGISTERS, action="decrease")

  @plgpu.nd_loop(grid, collective_axes="sm", init_carry=jnp.int32(0))
  def loaded_steps(info, carry):  # (nd_loop passes the carry by this name)
    first_step, work = carry, work_at(info.index)  # operand blocks loaded so far, which name the next stage
    steps = jnp.maximum(work.steps, 0)
    load = functools.partial(_load_tile, block, work, first_step, steps, info.local_index)
    if work.rows is None:
      load(block_rows)
    else:  # once per tile, as the compute warpgroups choose their mainloop
      for r in sorted({HALF_TILE_ROWS, block_rows}):
        pl.when(work.rows == r)(functools.partial(load, r))
    return first_step + steps

  # The last stages' releases too: every phase of a barrier must be awaited (Pallas' interpreter checks this).
  pl.loop(jnp.maximum(loaded_steps - block.staging.stages, 0), loaded_steps)(block.await_consumed)


def _load_tile(block: _Block, work: TileWork, first_step, steps, local_index, r: int) -> None:
  """Copies one tile's `steps` operand blocks (the lhs blocks' top r rows) into the ring's stages from first_step
  on, each once its stage is released, signalling the `loaded` barrier of the tile's owner."""
  stages = block.staging.stages

  @pl.loop(0, steps)
  def _(k):
    step = first_step + k
    stage = block.stage_of(step)
    pl.when(step >= stages)(lambda: block.await_consumed(step - stages))  # the stage's last blocks were read
    signal = block.loaded_at(block.owner_of(local_index), step)

    def copy(a_src, b_srcs):
      plgpu.copy_gmem_to_smem(a_src, block.a_ring.at[stage, pl.ds(0, r)], signal)
      for b_src, b_ring in zip(b_srcs, block.b_rings):
        plgpu.copy_gmem_to_smem(b_src, b_ring.at[stage], signal)

    work.operands(k, r, copy)


def _compute_warpgroup(block: _Block, grid: tuple, work_at: Callable, mma: Callable) -> None:
  """A compute warpgroup: walks the block's tiles in the memory warpgroup's order, counting their steps to know
  each one's stages, and accumulates and stores those it owns (all, or in ping-pong every other one)."""
  cfg = block.cfg
  plgpu.set_max_registers(_COMPUTE_REGISTERS, action="increase")

  @plgpu.nd_loop(grid, collective_axes="sm", init_carry=jnp.int32(0))
  def _(info, carry):
    first_step, work = carry, work_at(info.index)  # as the memory warpgroup's
    steps = jnp.maximum(work.steps, 0)
    accumulate = functools.partial(_accumulate_tile, block, work, first_step, steps, mma)
    pl.when((work.steps >= 0) & (block.owner_of(info.local_index) == block.awaited))(
      lambda: pl.run_scoped(accumulate, **{f"acc{i}": plgpu.ACC((cfg.tile_m, cfg.tile_n), jnp.float32)
                                           for i in range(block.products)}))
    return first_step + steps


def _accumulate_tile(block: _Block, work: TileWork, first_step, steps, mma: Callable, **accs) -> None:
  """One tile on warpgroup wg: accumulates its products in fp32 `accs` (acc0, acc1, ...: one per product), releases
  its stages, and stores the epilogue."""
  accs = [accs[f"acc{i}"] for i in range(block.products)]
  if block.epilogue.sides:
    pl.when(steps == 0)(lambda: _load_first_sides(block, work))
  # One loop per count of rows held, chosen once per tile: a branch around each wgmma would slow every tile, also
  # under even routing, which has no half tiles.
  block.for_held_rows(work, functools.partial(_mainloop, block, work, first_step, steps, mma, accs), or_none=True)
  plgpu.wgmma_wait(0)
  for late in range(block.cfg.delay_release):  # the tile's last blocks, still held by the mainloop
    pl.when(steps > late)(lambda late=late: block.release(first_step + steps - 1 - late))
  _store_tile(block, [acc[...] for acc in accs], work)


def _mainloop(block: _Block, work: TileWork, first_step, steps, mma: Callable, accs: list, r: int) -> None:
  """The tile's K steps for warpgroup wg's part holding r rows: await the stage, issue its wgmmas, and release the
  stage delay_release steps later, once the wgmmas that read it have completed. With r = 0 (the lower part of a
  half tile) no wgmma is issued, yet every stage is awaited and released: a block shared by both warpgroups frees
  a stage on both their arrivals."""
  cfg = block.cfg
  top = lambda ref: ref if r == cfg.tile_m else ref.at[pl.ds(0, r)]

  @pl.loop(0, steps)
  def _(k):
    step = first_step + k
    stage = block.stage_of(step)
    plgpu.barrier_wait(block.loaded_at(block.awaited, step))
    if block.epilogue.sides:
      # Halfway through the mainloop, not before its first step: the loads wait for the previous tile's stores to
      # leave the slots, and there they would hold back the tile's first wgmma.
      pl.when(k == steps // 2)(lambda: _load_first_sides(block, work))
    if r:
      for acc, b_ring in zip(accs, block.b_rings):
        a, b = mma(block.wg, block.a_ring.at[stage], b_ring.at[stage])
        plgpu.wgmma(top(acc), top(a), b)
      plgpu.wgmma_wait(cfg.delay_release * block.products)  # each wgmma is a group of its own
    pl.when(k >= cfg.delay_release)(lambda: block.release(step - cfg.delay_release))


def _run_tiles(cfg: TileConfig, dtype, grid: tuple, work_at: Callable, a_block: tuple, b_block: tuple,
               mma: Callable, products: int = 1, epilogue: Epilogue = EPILOGUES["products"]) -> None:
  """The body of a persistent kernel over `grid`'s output tiles (split among the blocks along "sm"): for each,
  `work_at(index)` says what to accumulate and where the epilogue stores. The memory warpgroup streams operand
  blocks (a_block and `products` b_block shapes) through one ring of stages for all the block's tiles, so the next
  tile's first blocks arrive while the compute warpgroups finish the last one and store it, rather than after the
  tile's last blocks are consumed, as a pipeline per tile would. mma(wg, a_smem, b_smem) gives warpgroup wg's wgmma
  operands. With cfg.split "pingpong" the block's tiles go to the compute warpgroups in turn, and each stage's
  loads are signalled to its tile's warpgroup alone: Mosaic tracks a barrier's phase per thread, so a warpgroup
  must await every phase of the barriers it waits on, and none of the others'."""
  staging = _staging(cfg, dtype, products, epilogue)
  scratch = _scratch(cfg, staging, dtype, a_block, b_block, products, epilogue)

  def kernel(a_ring, b_rings, loaded, consumed, out_smem, side_barriers=None):
    wg = lax.axis_index("wg")
    wg_first_row = wg * cfg.tile_m if cfg.split == "m" else 0  # of the warpgroup's part, in the block
    block = _Block(cfg, dtype, staging, products, epilogue, wg, wg_first_row, a_ring, b_rings, loaded, consumed,
                   out_smem, side_barriers)
    lax.cond(wg == 2, functools.partial(_memory_warpgroup, block, grid, work_at, a_block[0]),
             functools.partial(_compute_warpgroup, block, grid, work_at, mma))
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  pl.run_scoped(kernel, **scratch, collective_axes="wg")


# Each kernel launch is a jitted function of its shapes and tiles: every layer of a model calls the same few, and a
# jitted call's trace and lowering are reused, so each distinct kernel is lowered once per program rather than once
# per layer.
@functools.partial(jax.jit, static_argnames=("transpose_rhs", "cfg", "interpret", "epilogue"))
def grouped_forward(lhs, rhs, group_sizes_G, *, transpose_rhs: bool, cfg: TileConfig, interpret: bool = False,
                    epilogue: str = "products", sides: tuple = ()):
  """out[r] = lhs[r] @ rhs[g(r)] (lhs [P, K], rhs [G, K, N]), or lhs[r] @ rhs[g(r)].T (rhs [G, N, K], transpose_rhs).
  `rhs` may be a tuple of stacks (not transposed; gate and up): then a tuple of products, each lhs tile loaded once.
  `lhs` may be a tuple of terms beside a tuple `rhs`: then one product, sum_i lhs[i][r] @ rhs[i][g(r)], the terms'
  K blocks accumulated in turn (the SwiGLU's input gradient dgate @ gate.T + dup @ up.T in one kernel).
  `epilogue` (a name in EPILOGUES) computes what is stored from the fp32 products and from `sides` ([P, N]
  arrays); a tuple when it stores more than one array."""
  stacks = rhs if isinstance(rhs, tuple) else (rhs,)
  lhs_terms = lhs if isinstance(lhs, tuple) else (lhs,)
  if len(lhs_terms) > 1 and len(lhs_terms) != len(stacks):
    raise ValueError(f"grouped_forward: {len(lhs_terms)} lhs terms need as many rhs stacks, got {len(stacks)}")
  # Each lhs term's rhs stacks, by index: its own (a sum of terms), or every stack (one lhs, a product per stack)
  stacks_T = tuple((i,) for i in range(len(stacks))) if len(lhs_terms) > 1 else (tuple(range(len(stacks))),)
  products = len(stacks_T[0])
  post = _epilogue(epilogue)
  if len(sides) != post.sides:
    raise ValueError(f"epilogue {epilogue!r} takes {post.sides} side arrays, got {len(sides)}")
  _check_dtypes("grouped_forward", *lhs_terms, *stacks, *sides)
  p = lhs_terms[0].shape[0]
  g, n = stacks[0].shape[0], stacks[0].shape[1 if transpose_rhs else 2]
  dtype = lhs_terms[0].dtype
  for term, term_lhs in enumerate(lhs_terms):
    if term_lhs.shape[0] != p or term_lhs.shape[1] % cfg.tile_k or p % ALIGN or cfg.block_m % ALIGN:
      raise ValueError(f"grouped_forward: term {term}'s [{term_lhs.shape[0]}, {term_lhs.shape[1]}] x [.., {n}] does "
                       f"not divide into {ALIGN}-row groups ({p} rows), {cfg.block_m}-row blocks and K tile "
                       f"{cfg.tile_k}; pick a TileConfig that divides it (see forward_config)")
  if interpret and n % cfg.block_n:
    raise ValueError(f"grouped_forward: Pallas' interpreter cannot run a column tile past n={n} (block_n="
                     f"{cfg.block_n}); use a TileConfig whose block_n divides n (forward_config's do)")
  # On the GPU the last column tile may run past n, as the weight gradient's do (see _weight_grad_kernel).
  # Each group's tiles: at most sizes / block_m + (block_m - ALIGN) / block_m of them (a half tile last)
  m_iters, n_iters = (p + g * (cfg.block_m - ALIGN)) // cfg.block_m, pl.cdiv(n, cfg.block_n)
  k_iters_T = [term_lhs.shape[1] // cfg.tile_k for term_lhs in lhs_terms]
  tile_first_row_M, tile_rows_M, tile_group_M = row_tiles(group_sizes_G, cfg.block_m, m_iters)
  tile_steps_M = jnp.where(tile_rows_M > 0, sum(k_iters_T), -1).astype(jnp.int32)  # -1: skip the tile

  def mma(wg, a_smem, b_smem):
    if transpose_rhs:
      b = b_smem.at[_wg_slice(cfg, wg, "n"), :].transpose((1, 0))
    else:
      b = b_smem.at[:, _wg_slice(cfg, wg, "n")]
    return a_smem.at[_wg_slice(cfg, wg, "m")], b

  def body(tile_first_row_gmem, tile_rows_gmem, tile_group_gmem, tile_steps_gmem, *refs):
    ends = list(itertools.accumulate((len(lhs_terms), len(stacks), post.sides)))
    a_gmems, b_gmems, side_gmems, out_gmems = (refs[start:end] for start, end in zip((0, *ends), (*ends, None)))

    def work_at(index):
      mi, ni = plgpu.planar_snake(index[0], (m_iters, n_iters), 1, cfg.grid_tile_width)
      # multiple_of: without it Mosaic's layout inference fails on a TMA row offset loaded from a table (jax 0.10)
      first_row = pl.multiple_of(tile_first_row_gmem[mi], HALF_TILE_ROWS)
      rows, cols = tile_rows_gmem[mi], pl.ds(ni * cfg.block_n, cfg.block_n)

      def operands(k, r, copy):
        first = 0  # the term's first K block among the tile's
        for a_gmem, stack_ids, k_iters in zip(a_gmems, stacks_T, k_iters_T):
          kk = pl.ds((k - first) * cfg.tile_k, cfg.tile_k)
          weights = [b_gmems[i].at[tile_group_gmem[mi]] for i in stack_ids]
          load = functools.partial(copy, a_gmem.at[pl.ds(first_row, r), kk],
                                   tuple(w.at[cols, kk] if transpose_rhs else w.at[kk, cols] for w in weights))
          if len(lhs_terms) == 1:
            load()
          else:
            pl.when((k >= first) & (k < first + k_iters))(load)
          first += k_iters

      columns_of = lambda refs: tuple(ref.at[:, cols] for ref in refs)
      return TileWork(tile_steps_gmem[mi], operands, columns_of(out_gmems), first_row, columns_of(side_gmems), rows)

    b_block = (cfg.block_n, cfg.tile_k) if transpose_rhs else (cfg.tile_k, cfg.block_n)
    _run_tiles(cfg, dtype, (m_iters * n_iters,), work_at, (cfg.block_m, cfg.tile_k), b_block, mma, products, post)

  outputs = products if post.outputs is None else post.outputs
  out_type = tuple(jax.ShapeDtypeStruct((p, n), dtype) for _ in range(outputs))
  name = f"expert_matmul{'_t' if transpose_rhs else ''}{'_terms' if len(lhs_terms) > 1 else ''}_{epilogue}"
  outs = launch(body, out_type, interpret, name)(tile_first_row_M, tile_rows_M, tile_group_M, tile_steps_M, *lhs_terms,
                                                 *stacks, *sides)
  return tuple(outs) if outputs > 1 else outs[0]


def row_tiles(group_sizes_G: jax.Array, block_m: int, m_iters: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The forward kernels' row tiles, in row order: each group's rows in tiles of block_m, the last holding the
  group's remaining rows (a multiple of ALIGN). Per tile: (first row, rows held, group), m_iters of them; the tiles
  past the last group hold 0 rows (skipped)."""
  sizes_G = group_sizes_G.astype(jnp.int32)
  tiles_G = (sizes_G + block_m - 1) // block_m
  tile_ends_G = jnp.cumsum(tiles_G)
  tile_M = jnp.arange(m_iters, dtype=jnp.int32)
  # compare_all: one small fusion. The default method ("scan") is a while loop, which on the GPU runs as a chain of
  # tiny kernels and copies before every call of the kernel.
  group_M = jnp.searchsorted(tile_ends_G, tile_M, side="right", method="compare_all")
  group_M = jnp.minimum(group_M, sizes_G.shape[0] - 1).astype(jnp.int32)
  within_M = (tile_M - (tile_ends_G - tiles_G)[group_M]) * block_m  # the tile's first row within its group
  first_row_M = (jnp.cumsum(sizes_G) - sizes_G)[group_M] + within_M
  # (rounded up to whole half tiles: a group size off the ALIGN grid computes extra rows rather than leave the kernel
  # waiting for loads that no branch issues)
  left_M = -(-(sizes_G[group_M] - within_M) // HALF_TILE_ROWS) * HALF_TILE_ROWS
  rows_M = jnp.where(tile_M < tile_ends_G[-1], jnp.minimum(block_m, left_M), 0)
  return first_row_M.astype(jnp.int32), rows_M.astype(jnp.int32), group_M


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
  are left unwritten (whatever the buffer held): zeros there would be 1 GB a layer at DeepSeek-V2-Lite's size,
  for values ESFT never reads."""
  _check_dtypes("grouped_weight_grad", lhs_PxK, rhs_PxN)
  if ALIGN % cfg.tile_k:
    raise ValueError(f"grouped_weight_grad: TileConfig {cfg}: tile_k={cfg.tile_k} must divide the groups' ALIGN="
                     f"{ALIGN}, which each expert's rows are a multiple of")
  sizes_G = group_sizes_G.astype(jnp.int32)
  start_blocks_G = (jnp.cumsum(sizes_G) - sizes_G) // cfg.tile_k
  steps_G = weight_grad_steps(sizes_G, cfg.tile_k, groups, first_group)
  # Block b takes tiles b, b + blocks, ...: the experts with the most rows go first, so that the tiles started last
  # are short ones (under skewed routing the last wave would otherwise wait on a long expert's tiles).
  order_G = jnp.argsort(-steps_G).astype(jnp.int32)
  return _weight_grad_kernel(order_G, start_blocks_G, steps_G, lhs_PxK, rhs_PxN, cfg=cfg, interpret=interpret)


# Jitted like grouped_forward; which experts train enters as the traced steps (-1: skip the expert), so layers with
# different ESFT selections share the kernel.
@functools.partial(jax.jit, static_argnames=("cfg", "interpret"))
def _weight_grad_kernel(order_G, start_blocks_G, steps_G, lhs_PxK, rhs_PxN, *, cfg: TileConfig, interpret: bool):
  k, n = lhs_PxK.shape[1], rhs_PxN.shape[1]
  g = steps_G.shape[0]
  dtype = lhs_PxK.dtype
  # The last column tile may run past n: TMA fills the loads past the arrays with zeros and drops such stores (on
  # the GPU only: Pallas' interpreter raises on such reads, and the CPU tests leave weight gradients to the GPU).
  m_iters, n_iters = k // cfg.block_m, pl.cdiv(n, cfg.block_n)

  def mma(wg, a_smem, b_smem):
    a = a_smem.at[:, _wg_slice(cfg, wg, "m")].transpose((1, 0))
    return a, b_smem.at[:, _wg_slice(cfg, wg, "n")]

  def body(order_gmem, start_blocks_gmem, steps_gmem, a_gmem, b_gmem, out_gmem):
    def work_at(index):
      gi = order_gmem[index[0]]
      mi, ni = plgpu.planar_snake(index[1], (m_iters, n_iters), 1, cfg.grid_tile_width)
      rows, cols = pl.ds(mi * cfg.block_m, cfg.block_m), pl.ds(ni * cfg.block_n, cfg.block_n)
      first = start_blocks_gmem[gi]

      def operands(k, _, copy):  # (a tile holds all its block_m rows)
        kk = pl.ds((first + k) * cfg.tile_k, cfg.tile_k)
        copy(a_gmem.at[kk, rows], (b_gmem.at[kk, cols],))

      return TileWork(steps_gmem[gi], operands, (out_gmem.at[gi, :, cols],), mi * cfg.block_m)

    _run_tiles(cfg, dtype, (g, m_iters * n_iters), work_at, (cfg.tile_k, cfg.block_m), (cfg.tile_k, cfg.block_n), mma)

  out_type = jax.ShapeDtypeStruct((g, k, n), dtype)
  return launch(body, out_type, interpret, "expert_weight_grad")(order_G, start_blocks_G, steps_G, lhs_PxK, rhs_PxN)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def tiled_matmul(lhs_PxK, rhs_GxKxN, group_sizes_G, interpret: bool = False,
                 trained_experts: tuple[int, ...] | None = None, first_group: jax.Array | int = 0):
  """out[r] = lhs[r] @ rhs[g(r)] for rows grouped by expert, each group a multiple of ALIGN rows; rows past them are
  left unwritten (read only the groups' rows).
  The gradient of rhs is computed only for the experts in `trained_experts` (default: all; global ids, rhs[g]
  being expert first_group + g) and left unwritten elsewhere: read only the experts named."""
  return grouped_forward(lhs_PxK, rhs_GxKxN, group_sizes_G, transpose_rhs=False, cfg=forward_config(),
                         interpret=interpret)


def _tiled_matmul_fwd(lhs_PxK, rhs_GxKxN, group_sizes_G, interpret, trained_experts, first_group):
  out = tiled_matmul(lhs_PxK, rhs_GxKxN, group_sizes_G, interpret, trained_experts, first_group)
  return out, (lhs_PxK, rhs_GxKxN, group_sizes_G, first_group)


def _tiled_matmul_bwd(interpret, trained_experts, residuals, dout_PxN):
  lhs_PxK, rhs_GxKxN, group_sizes_G, first_group = residuals
  dout_PxN = dout_PxN.astype(lhs_PxK.dtype)
  dlhs_PxK = _input_grad(dout_PxN, rhs_GxKxN, group_sizes_G, interpret)
  drhs_GxKxN = _weight_grad(lhs_PxK, dout_PxN, rhs_GxKxN, group_sizes_G, interpret, trained_experts, first_group)
  return dlhs_PxK, drhs_GxKxN, None, None


tiled_matmul.defvjp(_tiled_matmul_fwd, _tiled_matmul_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def tiled_swiglu(x_PxD, gate_GxDxF, up_GxDxF, down_GxFxD, group_sizes_G, interpret: bool = False,
                 trained_experts: tuple[int, ...] | None = None, first_group: jax.Array | int = 0):
  """(silu(x[r] @ gate[g(r)]) * (x[r] @ up[g(r)])) @ down[g(r)], rows as in `tiled_matmul`, weight gradients as
  there. Forward: one kernel loads each x tile once for gate and up, applies the SiLU to their fp32 products and
  stores the hidden's partial derivatives in gate and up for the backward. Backward: dgate and dup (the hidden's
  gradient times those) are the epilogue of the hidden's input-gradient kernel, and x's gradient
  dgate @ gate.T + dup @ up.T is one kernel's sum of two terms."""
  return _tiled_swiglu_fwd(x_PxD, gate_GxDxF, up_GxDxF, down_GxFxD, group_sizes_G, interpret, trained_experts,
                           first_group)[0]


def _tiled_swiglu_fwd(x_PxD, gate_GxDxF, up_GxDxF, down_GxFxD, group_sizes_G, interpret, trained_experts,
                      first_group):
  *partials_PxF, hidden_PxF = grouped_forward(x_PxD, (gate_GxDxF, up_GxDxF), group_sizes_G, transpose_rhs=False,
                                              cfg=SHARED_LHS_TILES, interpret=interpret, epilogue="swiglu")
  y_PxD = grouped_forward(hidden_PxF, down_GxFxD, group_sizes_G, transpose_rhs=False,
                          cfg=forward_config(), interpret=interpret)
  weights = (gate_GxDxF, up_GxDxF, down_GxFxD)
  return y_PxD, (x_PxD, weights, group_sizes_G, first_group, *partials_PxF, hidden_PxF)


def _tiled_swiglu_bwd(interpret, trained_experts, residuals, dy_PxD):
  x_PxD, (gate_GxDxF, up_GxDxF, down_GxFxD), group_sizes_G, first_group, *partials_PxF, hidden_PxF = residuals
  dy_PxD = dy_PxD.astype(x_PxD.dtype)
  dgate_PxF, dup_PxF = _input_grad(dy_PxD, down_GxFxD, group_sizes_G, interpret, "swiglu_grad", tuple(partials_PxF))
  terms_cfg = SUM_OF_TERMS_TILES
  if interpret and x_PxD.shape[1] % terms_cfg.block_n:  # the interpreter runs no column tile past the width
    terms_cfg = forward_config()
  dx_PxD = grouped_forward((dgate_PxF, dup_PxF), (gate_GxDxF, up_GxDxF), group_sizes_G, transpose_rhs=True,
                           cfg=terms_cfg, interpret=interpret)
  weight_grad = lambda lhs, dout, rhs: _weight_grad(lhs, dout, rhs, group_sizes_G, interpret, trained_experts,
                                                    first_group)
  return (dx_PxD, weight_grad(x_PxD, dgate_PxF, gate_GxDxF), weight_grad(x_PxD, dup_PxF, up_GxDxF),
          weight_grad(hidden_PxF, dy_PxD, down_GxFxD), None, None)


tiled_swiglu.defvjp(_tiled_swiglu_fwd, _tiled_swiglu_bwd)


def _input_grad(dout_PxN, rhs_GxKxN, group_sizes_G, interpret, epilogue="products", sides=()):
  """dout[r] @ rhs[g(r)].T, through `epilogue` (see grouped_forward)."""
  return grouped_forward(dout_PxN, rhs_GxKxN, group_sizes_G, transpose_rhs=True, cfg=forward_config(epilogue),
                         interpret=interpret, epilogue=epilogue, sides=sides)


def _weight_grad(lhs_PxK, dout_PxN, rhs_GxKxN, group_sizes_G, interpret, trained_experts, first_group):
  """rhs's gradient (see tiled_matmul): zeros without a kernel when nothing trains in the layer."""
  if trained_experts == ():
    return jnp.zeros_like(rhs_GxKxN)
  return grouped_weight_grad(lhs_PxK, dout_PxN, group_sizes_G, cfg=WEIGHT_GRAD_TILES, interpret=interpret,
                             groups=trained_experts, first_group=first_group)
