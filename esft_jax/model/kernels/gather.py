"""Row gathers as a Mosaic GPU kernel: out[m] = src[index[m]] (times scale[m]), rows moved by TMA.

The expert layout moves [tokens x K, D] activations twice a layer (the dispatch forward, the combine backward).
XLA's gather writes bf16 rows element by element; a copy through shared memory is bounded by HBM bandwidth alone,
and is faster on the H200 (BENCHMARKS.md, kernel choices). One warpgroup per multiprocessor
takes chunks of `rows` output rows: it loads each chunk's source rows into a ring of shared-memory stages (TMA,
`stages - 1` chunks in flight), optionally scales them in registers, and stores the chunk with one TMA copy.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from esft_jax.model.kernels.mosaic import blocks, launch

_STAGE_BYTES = 32 * 1024  # one chunk of rows in shared memory
_RING_BYTES = 192 * 1024  # shared memory for the ring (and the scaled chunks' staging)
_BOX = 256  # TMA copies at most 256 elements along each dimension


def supported(d: int, dtype) -> bool:
  """Whether gather_rows runs rows of width d on its kernel: 16- or 32-bit rows of a multiple of 2 KiB (whole TMA
  boxes, and a row the scaled path can spread over the warpgroup's registers; 4 and 8 KiB ran on the GPU), at most
  one stage."""
  row_bytes = d * jnp.dtype(dtype).itemsize
  return jnp.dtype(dtype).itemsize in (2, 4) and row_bytes % 2048 == 0 and row_bytes <= _STAGE_BYTES


@functools.partial(jax.jit, static_argnames=("interpret",))
def gather_rows(src_NxD: jax.Array, index_M: jax.Array, scale_M: jax.Array | None = None, *,
                interpret: bool = False) -> jax.Array:
  """[M, D]: src[index[m]], times scale[m] (fp32, computed in fp32) when given. Indices are clipped into [0, N):
  pass a scale of 0 where a row must come out zero."""
  n, d = src_NxD.shape
  (m,) = index_M.shape
  dtype = src_NxD.dtype
  if not supported(d, dtype):
    raise ValueError(f"gather_rows: rows of {d} x {jnp.dtype(dtype).name} do not tile into TMA copies; "
                     "use jnp.take for them (see gather.supported)")
  width = math.gcd(d, _BOX)
  pieces = d // width  # a row is `pieces` rows of `width` in the [N * pieces, width] views below
  row_bytes = d * jnp.dtype(dtype).itemsize
  rows = max(1, min(_BOX // pieces, _STAGE_BYTES // row_bytes))
  rows = math.gcd(rows, m & -m) if m else 1  # a power of two dividing m: every chunk is whole
  chunk_bytes = rows * row_bytes
  staging = 0 if scale_M is None else 2  # scaled chunks are written to their own two stages
  stages = max(2, min(8, _RING_BYTES // chunk_bytes - staging))
  chunks, num_blocks = m // rows, blocks(interpret)
  index_M = jnp.clip(index_M.astype(jnp.int32), 0, n - 1)

  def body(index_gmem, *refs):
    if scale_M is None:
      scale_gmem, (src_gmem, out_gmem, ring, barriers) = None, refs
    else:
      scale_gmem, src_gmem, out_gmem, ring, staged, barriers = refs
    sm = lax.axis_index("sm")
    count = jnp.maximum(chunks - sm + num_blocks - 1, 0) // num_blocks  # chunks sm, sm + num_blocks, ...
    # Row r of local chunk i; past the last chunk, the last row (read ahead of need, never used).
    row = lambda i, r: jnp.minimum((sm + i * num_blocks) * rows + r, m - 1)
    # Scalars read from global memory are read a chunk ahead of their use, so no copy waits on their latency.
    sources = lambda i: [index_gmem[row(i, r)] for r in range(rows)]
    scales = lambda i: [scale_gmem[row(i, r)] for r in range(rows)] if scale_gmem is not None else []

    def load(i, chunk_sources):
      slot = lax.rem(i, stages)
      for r, source in enumerate(chunk_sources):
        plgpu.copy_gmem_to_smem(src_gmem.at[pl.ds(source * pieces, pieces)], ring.at[slot, pl.ds(r * pieces, pieces)],
                                barriers.at[slot])

    for i in range(stages - 1):
      pl.when(i < count)(functools.partial(load, i, sources(i)))

    def step(i, ahead):
      next_sources, chunk_scales = ahead
      ahead = (sources(i + stages), scales(i + 1))
      slot = lax.rem(i, stages)
      dst = out_gmem.at[pl.ds(row(i, 0) * pieces, rows * pieces)]
      plgpu.barrier_wait(barriers.at[slot])
      if scale_gmem is None:
        plgpu.copy_smem_to_gmem(ring.at[slot], dst)
        plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # chunk i - 1's store has read the slot refilled next
      else:
        out = lax.rem(i, 2)
        plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # chunk i - 2's store has read this staging stage
        for r, scale in enumerate(chunk_scales):
          part = pl.ds(r * pieces, pieces)
          staged[out, part] = (ring[slot, part].astype(jnp.float32) * scale).astype(dtype)
        plgpu.commit_smem()  # the writes are visible to the store, and every thread is done reading the slot
        plgpu.copy_smem_to_gmem(staged.at[out], dst)
      pl.when(i + stages - 1 < count)(functools.partial(load, i + stages - 1, next_sources))
      return ahead

    lax.fori_loop(0, count, step, (sources(stages - 1), scales(0)))
    plgpu.wait_smem_to_gmem(0)

  def kernel(index_gmem, *refs):
    scratch = {"ring": plgpu.SMEM((stages, rows * pieces, width), dtype),
               "barriers": plgpu.Barrier(num_arrivals=rows, num_barriers=stages)}
    if scale_M is not None:
      scratch["staged"] = plgpu.SMEM((2, rows * pieces, width), dtype)

    def scoped(ring, barriers, staged=None):
      extra = () if staged is None else (staged,)
      body(index_gmem, *refs, ring, *extra, barriers)

    pl.run_scoped(scoped, **scratch, collective_axes="wg")

  inputs = (index_M,) + (() if scale_M is None else (scale_M.astype(jnp.float32),))
  out = launch(kernel, jax.ShapeDtypeStruct((m * pieces, width), dtype), interpret, "gather_rows", warpgroups=1)(
    *inputs, src_NxD.reshape(n * pieces, width))
  return out.reshape(m, d)
