"""Training attention alone, at DeepSeek-V2-Lite's MLA widths: the fused path against the reference and against
what it replaced.

    python experiments/bench_attention.py                          # one GPU: batch 8 x 2048, 16 heads, bf16
    python experiments/bench_attention.py --segments 4             # rows of 4 packed documents
    python experiments/bench_attention.py --max-segments 16        # the cost of a looser static bound
    python experiments/bench_attention.py --tiny                   # CPU, seconds

Variants:
- reference: the materialised fp32 scores (`attend(..., impl="reference")`);
- fused: what the model runs (`attend(..., impl="fused", max_segments=...)`): on a GPU cuDNN's flash attention
  given the segments as lengths (one per row) or as packed offsets (more);
- bias: the fused path without a bound (`max_segments=None`): `jax.nn.dot_product_attention` with the segment
  mask as a [B, 1, L, L] bias and the values padded to the keys' width;
- causal (GPU only): cuDNN causal over the whole row with the values at their own width, no segments: the
  fastest the fused path could be.
--segments N packs each row with N equal documents; the causal variant then computes another function and is
left out. A variant that fails prints its error.

Columns: ms is the median of --iters calls after a warm-up (the first compiles); TFLOP/s counts the causal matmuls
a flash kernel needs, forward F = 2 * B * H * S(S+1)/2 * (d_qk + d_v) with the values' true width, and F + 2F for
forward and backward (the same count as bench_train.py's MFU); temp GiB is XLA's planned temporary memory; max
|diff| is the largest difference of the forward output from the reference's.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from esft_jax.model.attention import attend
from timing import median_call_ms

VARIANTS = ("reference", "fused", "bias", "causal")
QK_WIDTH, V_WIDTH = 192, 128  # DeepSeek-V2-Lite's MLA heads: 128 + 64 rotary query/key dims, 128 value dims


def _causal(q, k, v, segment_ids_BxL, scale: float):
  from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention  # no public name
  del segment_ids_BxL
  return dot_product_attention(q, k, v, scale=scale, mask_type=MaskType.CAUSAL)


def attention_fn(variant: str, scale: float, max_segments: int = 1):
  if variant not in VARIANTS:
    raise ValueError(f"variant {variant!r} is unknown; use some of {', '.join(VARIANTS)}")
  if variant == "causal":
    return functools.partial(_causal, scale=scale)
  impl = "reference" if variant == "reference" else "fused"
  bound = max_segments if variant == "fused" else None  # bias: the fused path without a bound
  return lambda q, k, v, seg: attend(q, k, v, seg, None, scale, impl, bound)


def causal_flops(batch: int, seq: int, heads: int, segments: int) -> float:
  """The forward's matmul FLOPs when each query sees the keys up to itself within its segment."""
  length = seq // segments
  return 2 * batch * heads * segments * length * (length + 1) / 2 * (QK_WIDTH + V_WIDTH)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=2048)
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--segments", type=int, default=1, help="equal packed segments per row (dividing --seq)")
  parser.add_argument("--max-segments", type=int, help="the fused path's static bound (default: --segments)")
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--variants", default=",".join(VARIANTS), help=f"some of {', '.join(VARIANTS)}")
  parser.add_argument("--tiny", action="store_true",
                      help="batch 2 x 64, 2 heads, fp32 on the CPU (CI keeps it working)")
  args = parser.parse_args()
  dtype = jnp.bfloat16
  if args.tiny:
    args.batch, args.seq, args.heads, args.iters, dtype = 2, 64, 2, 2, jnp.float32
  if args.seq % args.segments:
    parser.error(f"--segments {args.segments} does not divide --seq {args.seq}")
  max_segments = args.max_segments or args.segments
  variants = args.variants.split(",")
  for variant in variants:
    attention_fn(variant, 1.0)  # an unknown name fails before any work
  left_out = {"causal": "ignores segments"} if "causal" in variants and args.segments > 1 else {}
  if "causal" in variants and jax.default_backend() != "gpu":
    left_out["causal"] = "needs a GPU"

  rng = np.random.default_rng(0)
  shape = (args.batch, args.seq, args.heads)
  q, k = (jnp.asarray(rng.standard_normal((*shape, QK_WIDTH)), dtype) for _ in range(2))
  v, cotangent = (jnp.asarray(rng.standard_normal((*shape, V_WIDTH)), dtype) for _ in range(2))
  segment_ids = jnp.broadcast_to(jnp.repeat(jnp.arange(1, args.segments + 1, dtype=jnp.int32),
                                            args.seq // args.segments), (args.batch, args.seq))
  scale = QK_WIDTH ** -0.5
  forward_flops = causal_flops(args.batch, args.seq, args.heads, args.segments)

  print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}; batch {args.batch} x {args.seq} in "
        f"{args.segments} segment(s) per row (fused path built for {max_segments}), {args.heads} heads, q/k width "
        f"{QK_WIDTH}, v width {V_WIDTH}, {jnp.dtype(dtype).name}; causal forward {forward_flops / 1e12:.3f} TFLOP",
        flush=True)
  print("| variant | pass | ms | TFLOP/s | temp GiB | max abs diff |")
  print("|---|---|---|---|---|---|", flush=True)
  reference = jax.jit(attention_fn("reference", scale))(q, k, v, segment_ids).astype(jnp.float32)
  for variant in (v for v in variants if v not in left_out):
    fn = attention_fn(variant, scale, max_segments)
    grad = jax.grad(lambda q, k, v, seg, cot: jnp.vdot(fn(q, k, v, seg).astype(jnp.float32), cot.astype(jnp.float32)),
                    argnums=(0, 1, 2))
    passes = (("fwd", fn, (q, k, v, segment_ids), forward_flops),
              ("fwd+bwd", grad, (q, k, v, segment_ids, cotangent), 3 * forward_flops))
    try:
      for name, f, inputs, flops in passes:
        compiled = jax.jit(f).lower(*inputs).compile()  # timed and sized as one program
        if name == "fwd":
          diff = float(jnp.max(jnp.abs(compiled(*inputs).astype(jnp.float32) - reference)))
        ms = median_call_ms(compiled, *inputs, iters=args.iters)
        stats = compiled.memory_analysis()
        gib = "-" if stats is None else f"{stats.temp_size_in_bytes / 2**30:.2f}"
        print(f"| {variant} | {name} | {ms:.3f} | {flops / ms / 1e9:.1f} | {gib} | {diff:.2e} |", flush=True)
    except Exception as err:  # a variant cuDNN does not take is a result; the others still run
      first = (str(err).strip().splitlines() or [""])[0][:200]
      print(f"| {variant} | - | {type(err).__name__}: {first} | - | - | - |", flush=True)
  for variant, why in left_out.items():
    print(f"# {variant}: left out, {why}")


if __name__ == "__main__":
  main()
