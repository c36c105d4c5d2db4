"""One-off (session 14): output staging in pieces (`TileConfig.store_n`) for the forward-style kernels whose epilogue
has no side arrays (the down projection's forward, gate's input gradient). Pieces of 16 columns leave shared memory
for a 4th pipeline stage of 128 x 128 tiles. Compares, per kernel and for the whole SwiGLU fwd+bwd:
- "whole": 128 x 128 whole-tile staging below 32k rows (the code before this session), 64 x 256 from 32k;
- "pieces<32k": forward_config as shipped (pieces of 16 below 32k rows, 64 x 256 from 32k);
- "pieces": 128 x 128 in pieces of 16 at every size.
Outputs are compared with "whole"'s (same K order: they should be equal).

    PYTHONPATH=. python3 experiments/results/gpu-2026-11-29-s14/sexp.py          # call 3: each kernel and the whole
    PYTHONPATH=. python3 experiments/results/gpu-2026-11-29-s14/sexp.py repeat   # call 4: the whole at 16k, 3 rounds
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
shipped = tiled.forward_config


def whole(n, rows=0, epilogue="products"):
  return dataclasses.replace(shipped(n, rows, epilogue), store_n=None)


def pieces(n, rows=0, epilogue="products"):
  return shipped(n, 0, epilogue)  # the small-row choice at every size


VARIANTS = {"whole": whole, "pieces<32k": shipped, "pieces": pieces}


def err(a, b):
  a, b = (np.asarray(jax.tree.leaves(v)[0], np.float32) for v in (a, b))
  return float(np.max(np.abs(a - b)))


def case(rows, skewed, only_whole=False, variants=VARIANTS, iters=20):
  data = make_data(rows, 6, 64, D, F, skewed, seed=rows + skewed)
  lay, e = data["layouts"][128], data["experts"]
  gs, real = lay.group_sizes_G, data["rows"]
  x, dy = dispatch(data["x"], lay), dispatch(data["cotangent"], lay)
  gate, up, down = e["gate_proj"], e["up_proj"], e["down_proj"]
  mm = 2 * real * D * F
  tag = f"{rows} {'skewed' if skewed else 'even'}"
  p = x.shape[0]
  *partials, hidden = tiled.grouped_forward(x, (gate, up), gs, transpose_rhs=False, cfg=tiled.SHARED_LHS_TILES,
                                            epilogue="swiglu")
  dgate, _ = tiled._input_grad(dy, down, gs, False, "swiglu_grad", tuple(partials))
  fwd = lambda t: lambda a, b, g: tiled.grouped_forward(a, b, g, transpose_rhs=t, cfg=tiled.forward_config(D, p))
  grads = lambda x, g_, u_, d_, c: jax.vjp(lambda *w: tiled.tiled_swiglu(*w, gs), x, g_, u_, d_)[1](c)
  ops = {
    "fwd down": (mm, lambda: fwd(False), (hidden, down, gs)),
    "dgate@gate^T": (mm, lambda: fwd(True), (dgate, gate, gs)),
    "whole SwiGLU fwd+bwd": (9 * mm, lambda: lambda x, g_, u_, d_, c: (tiled.tiled_swiglu(x, g_, u_, d_, gs),
                                                                         grads(x, g_, u_, d_, c)),
                             (x, gate, up, down, dy)),
  }
  for name, (flops, make, args) in ops.items():
    if only_whole and name != "whole SwiGLU fwd+bwd":
      continue
    ref = None
    for variant, config in variants.items():
      tiled.forward_config = config
      try:
        ms = time_jax(make(), args, warmup=3, iters=iters)[0]
        val = jax.jit(make())(*args)
        ref = val if ref is None else ref
        diff = "" if val is ref else f"{err(val, ref):.1e}"
        print(f"| {tag} | {name} | {variant} | {config(D, p)} | {ms:.3f} | {flops / ms / 1e9:.1f} | {diff} |",
              flush=True)
      except Exception as ex:  # noqa: BLE001 (a one-off comparison: show the failure and go on)
        print(f"| {tag} | {name} | {variant} | failed | {type(ex).__name__}: {str(ex).splitlines()[0][:120]} | |")
  tiled.forward_config = shipped


print(f"# jax {jax.__version__} on {jax.devices()[0].device_kind}")
print("| rows | op | variant | down fwd tiles | ms | TFLOP/s | max diff vs whole |\n|---|---|---|---|---|---|---|")
if sys.argv[1:] == ["repeat"]:  # the whole SwiGLU at 16k, variants interleaved, three rounds of 50 steps
  for _ in range(3):
    for skewed in (False, True):
      case(16384, skewed, only_whole=True, variants={k: VARIANTS[k] for k in ("whole", "pieces<32k")}, iters=50)
else:
  for rows in (16384, 32768, 65536):
    for skewed in (False, True):
      case(rows, skewed)
