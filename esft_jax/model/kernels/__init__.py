"""Fast routed-expert kernels for GPUs (Hopper), behind `expert_ffn(..., impl="gpu")`.

- `tiled`: our own Mosaic GPU kernels on expert-aligned row tiles (forward, input and weight gradients).
- `ragged`: the Mosaic GPU ragged-dot kernels that jax ships, wrapped with a VJP.
- `ffn.gpu_expert_ffn`: the expert SwiGLU on either family; `layout`: the expert-grouped row layout, and the
  dispatch into it and combine out of it; `gather`: the row-gather kernel of the dispatch forward and the
  combine backward, where rows allow.
- `mosaic`: how our Mosaic GPU kernels are launched (or interpreted on the CPU).

Importing this package is cheap; the kernel modules import Pallas' Mosaic GPU backend.
"""

from __future__ import annotations

import jax


def hopper_available() -> bool:
  """Whether the default device is a Hopper GPU (compute capability 9.x), which these kernels are written for."""
  device = jax.devices()[0]
  return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9")
