"""Launching our Mosaic GPU kernels: one block per multiprocessor, or Pallas' GPU interpreter on the CPU."""

from __future__ import annotations

import jax
from jax.experimental.pallas import mosaic_gpu as plgpu

_INTERPRET_SMS = 2  # blocks in interpret mode (CPU tests)


def blocks(interpret: bool) -> int:
  """How many blocks `launch` runs: one per multiprocessor of the default device."""
  return _INTERPRET_SMS if interpret else jax.devices()[0].core_count


def launch(body, out_type, interpret: bool, name: str, warpgroups: int = 3):
  """Runs body on `blocks(interpret)` blocks (axis "sm") of `warpgroups` warpgroups each (axis "wg"); `name` is
  the kernel's name in profiles."""
  mode = None
  if interpret:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # no public name yet

    mode = InterpretGPUParams()
  return plgpu.kernel(
    body,
    out_type=out_type,
    grid=(blocks(interpret),),
    grid_names=("sm",),
    num_threads=warpgroups,
    thread_name="wg",
    # approx_math: the epilogues' exp and rsqrt as one fast instruction each
    compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup, approx_math=True),
    interpret=mode,
    kernel_name=name,
  )
