"""One-off (session 13): the order in which the persistent `tiled` kernels visit output tiles. planar_snake walks
bands of `grid_tile_width` column tiles (4 until now): a band as wide as the output reads each lhs row tile once;
a narrow band keeps fewer weight columns live in L2. Times each forward-style kernel of the SwiGLU, and the whole
SwiGLU fwd+bwd, for several widths; outputs are compared with width 4's (the accumulation order is the same, so
they should be equal).

    PYTHONPATH=. python3 experiments/results/gpu-2026-11-30-s13/oexp.py
"""
import dataclasses
import sys

sys.path.insert(0, "experiments")
import jax
import numpy as np

from bench_moe import make_data, time_jax
from esft_jax.model.kernels import tiled
from esft_jax.model.kernels.layout import dispatch

D, F = 2048, 1408
WIDTHS = (1, 2, 4, 8, 16)
shared_tiles, forward_config = tiled.SHARED_LHS_TILES, tiled.forward_config


def use_width(width):
  tiled.SHARED_LHS_TILES = dataclasses.replace(shared_tiles, grid_tile_width=width)
  tiled.forward_config = lambda *a, **k: dataclasses.replace(forward_config(*a, **k), grid_tile_width=width)


def bench(fn, *args):
  """ms back to back (mean of 20 after 3 warm-up calls) and the outputs."""
  return time_jax(fn, args, warmup=3, iters=20)[0], jax.jit(fn)(*args)


def err(a, b):  # over the first output
  a, b = (np.asarray(jax.tree.leaves(v)[0], np.float32) for v in (a, b))
  return float(np.max(np.abs(a - b)))


def case(rows, skewed, kernels):
  data = make_data(rows, 6, 64, D, F, skewed, seed=rows + skewed)
  lay, e = data["layouts"][128], data["experts"]
  gs, real = lay.group_sizes_G, data["rows"]
  x, dy = dispatch(data["x"], lay), dispatch(data["cotangent"], lay)
  gate, up, down = e["gate_proj"], e["up_proj"], e["down_proj"]
  mm = 2 * real * D * F
  tag = f"{rows} {'skewed' if skewed else 'even'}"
  fwd = lambda cfg_of, ep="products", t=False: (
    lambda a, b, g, *s: tiled.grouped_forward(a, b, g, transpose_rhs=t, cfg=cfg_of(), epilogue=ep, sides=s))
  use_width(4)
  *partials, hidden = tiled.grouped_forward(x, (gate, up), gs, transpose_rhs=False, cfg=tiled.SHARED_LHS_TILES,
                                            epilogue="swiglu")
  dgate, _ = tiled._input_grad(dy, down, gs, False, "swiglu_grad", tuple(partials))
  ops = {
    "fwd gate,up +swiglu": (2 * mm, lambda: fwd(lambda: tiled.SHARED_LHS_TILES, "swiglu"), (x, (gate, up), gs)),
    "fwd down": (mm, lambda: fwd(lambda: tiled.forward_config(D, rows=x.shape[0])), (hidden, down, gs)),
    "dY@down^T +swiglu_grad": (mm, lambda: fwd(lambda: tiled.forward_config(F, 2, x.shape[0]), "swiglu_grad", True),
                               (dy, down, gs, *partials)),
    "dgate@gate^T": (mm, lambda: fwd(lambda: tiled.forward_config(D, 1, x.shape[0]), "products", True),
                     (dgate, gate, gs)),
  }
  whole = lambda x, g_, u_, d_, c: jax.vjp(lambda *w: tiled.tiled_swiglu(*w, gs), x, g_, u_, d_)[1](c)
  ops["whole SwiGLU fwd+bwd"] = (9 * mm, lambda: (lambda x, g_, u_, d_, c: (tiled.tiled_swiglu(x, g_, u_, d_, gs),
                                                                              whole(x, g_, u_, d_, c))),
                                 (x, gate, up, down, dy))
  for name, (flops, make, args) in ops.items():
    if not kernels and name != "whole SwiGLU fwd+bwd":
      continue
    ref = None
    for width in WIDTHS:
      use_width(width)
      try:
        ms, val = bench(make(), *args)
        ref = val if width == 4 else ref
        diff = "" if ref is None or width == 4 else f"{err(val, ref):.1e}"
        print(f"| {tag} | {name} | {width} | {ms:.3f} | {flops / ms / 1e9:.1f} | {diff} |", flush=True)
      except Exception as ex:  # noqa: BLE001 (a one-off sweep: show the failure and go on)
        print(f"| {tag} | {name} | {width} | failed | {type(ex).__name__}: {str(ex).splitlines()[0][:120]} | |")
  use_width(4)


print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; 64 experts, {D} -> {F}, top-6, bf16")
print("| rows | kernel | grid_tile_width | ms | TFLOP/s | max abs diff vs width 4 |")
print("|---|---|---|---|---|---|")
case(16384, False, kernels=True)
case(16384, True, kernels=False)
case(32768, False, kernels=False)
case(65536, False, kernels=True)
case(65536, True, kernels=False)
