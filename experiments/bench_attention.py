"""Training attention alone, at DeepSeek-V2-Lite's MLA widths: how much the packed-segment mask costs the fused path.

    python experiments/bench_attention.py                  # one GPU: batch 8 x 2048, 16 heads, bf16
    python experiments/bench_attention.py --tiny           # CPU, seconds

The model's fused attention (`esft_jax.model.attention.attend`, cuDNN's flash attention on a GPU) takes the
packed-segment mask as a [B, 1, L, L] bias, and cuDNN's backward writes that bias's gradient. The 8-layer ESFT step
spends a fifth of its kernel time here (BENCHMARKS.md, seventh session). Variants, on rows that are each one whole
segment, so that all of them compute the same function:
- reference: the materialised fp32 scores (`attend(..., impl="reference")`);
- fused: what the model runs (`attend(..., impl="fused")`): causal, plus the segment mask as a bias;
- fused-causal: causal alone, no mask (what rows of one segment without padding would need);
- fused-lengths: causal plus per-row lengths (`query_seq_lengths`, `key_value_seq_lengths`): rows of one segment
  followed by padding, without a bias.
The fused variants pad the values to the keys' width (192) as the model does.

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

VARIANTS = ("reference", "fused", "fused-causal", "fused-lengths")
QK_WIDTH, V_WIDTH = 192, 128  # DeepSeek-V2-Lite's MLA heads: 128 + 64 rotary query/key dims, 128 value dims


def _plain_fused(q, k, v, segment_ids_BxL, scale: float, lengths: bool):
  """jax.nn.dot_product_attention, causal, values padded to the keys' width; with `lengths`, each row's tokens
  up to its first padding (segment id 0)."""
  pad = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, QK_WIDTH - x.shape[-1])])
  backend = "cudnn" if jax.default_backend() == "gpu" else "xla"
  seq_lengths = jnp.sum(segment_ids_BxL != 0, axis=1).astype(jnp.int32) if lengths else None
  out = jax.nn.dot_product_attention(pad(q), pad(k), pad(v), scale=scale, is_causal=True, implementation=backend,
                                     query_seq_lengths=seq_lengths, key_value_seq_lengths=seq_lengths)
  return out[..., :V_WIDTH]


def attention_fn(variant: str, scale: float):
  if variant in ("reference", "fused"):
    return lambda q, k, v, seg: attend(q, k, v, seg, None, scale, variant)
  if variant in ("fused-causal", "fused-lengths"):
    return functools.partial(_plain_fused, scale=scale, lengths=variant == "fused-lengths")
  raise ValueError(f"variant {variant!r} is unknown; use some of {', '.join(VARIANTS)}")


def causal_flops(batch: int, seq: int, heads: int) -> float:
  return 2 * batch * heads * seq * (seq + 1) / 2 * (QK_WIDTH + V_WIDTH)


def temp_gib(jitted, *args) -> float | None:
  stats = jitted.lower(*args).compile().memory_analysis()
  return None if stats is None else stats.temp_size_in_bytes / 2**30


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=2048)
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--variants", default=",".join(VARIANTS), help=f"some of {', '.join(VARIANTS)}")
  parser.add_argument("--tiny", action="store_true", help="batch 2 x 64, 2 heads, fp32 on the CPU, to keep this working")
  args = parser.parse_args()
  dtype = jnp.bfloat16
  if args.tiny:
    args.batch, args.seq, args.heads, args.iters, dtype = 2, 64, 2, 2, jnp.float32
  variants = args.variants.split(",")
  for variant in variants:
    attention_fn(variant, 1.0)  # an unknown name fails before any work

  rng = np.random.default_rng(0)
  shape = (args.batch, args.seq, args.heads)
  q, k = (jnp.asarray(rng.standard_normal((*shape, QK_WIDTH)), dtype) for _ in range(2))
  v, cotangent = (jnp.asarray(rng.standard_normal((*shape, V_WIDTH)), dtype) for _ in range(2))
  segment_ids = jnp.ones((args.batch, args.seq), jnp.int32)  # each row one whole segment
  scale = QK_WIDTH ** -0.5
  forward_flops = causal_flops(args.batch, args.seq, args.heads)

  print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}; batch {args.batch} x {args.seq}, {args.heads} "
        f"heads, q/k width {QK_WIDTH}, v width {V_WIDTH}, {jnp.dtype(dtype).name}; causal forward "
        f"{forward_flops / 1e12:.3f} TFLOP", flush=True)
  print("| variant | pass | ms | TFLOP/s | temp GiB | max abs diff |")
  print("|---|---|---|---|---|---|", flush=True)
  reference = jax.jit(attention_fn("reference", scale))(q, k, v, segment_ids).astype(jnp.float32)
  for variant in variants:
    fn = attention_fn(variant, scale)
    forward = jax.jit(fn)
    diff = float(jnp.max(jnp.abs(forward(q, k, v, segment_ids).astype(jnp.float32) - reference)))
    both = jax.jit(jax.grad(lambda q, k, v, seg: jnp.vdot(fn(q, k, v, seg).astype(jnp.float32),
                                                          cotangent.astype(jnp.float32)), argnums=(0, 1, 2)))
    for name, jitted, flops in (("fwd", forward, forward_flops), ("fwd+bwd", both, 3 * forward_flops)):
      ms = median_call_ms(jitted, q, k, v, segment_ids, iters=args.iters)
      gib = temp_gib(jitted, q, k, v, segment_ids)
      print(f"| {variant} | {name} | {ms:.3f} | {flops / ms / 1e9:.1f} | "
            f"{'-' if gib is None else f'{gib:.2f}'} | {diff:.2e} |", flush=True)


if __name__ == "__main__":
  main()
