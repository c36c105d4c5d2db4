"""One-off (session 12): the layout's row gathers at the 27-layer step's shape, XLA against the gather kernel.

    PYTHONPATH=. python3 experiments/results/gpu-2026-11-29-s12/gexp.py [tokens]   # from the repository root;
                                                    # default 16384 tokens x top-6, D = 2048, bf16
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, "experiments")
from esft_jax.model.kernels.gather import gather_rows
from esft_jax.model.kernels.layout import expert_layout, take_rows
from timing import waited_and_back_to_back_ms

t = int(sys.argv[1]) if len(sys.argv) > 1 else 16384
k, d, e = 6, 2048, 64
rng = np.random.default_rng(0)
ids = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(t)]).astype(np.int32))
lay = expert_layout(ids, e, 128)
x = jnp.asarray(rng.standard_normal((t, d)), jnp.bfloat16)
w = jnp.asarray(rng.random((t, k)), jnp.float32)
p = lay.assignment_P.shape[0]
source = lay.source_P
a = jnp.minimum(lay.assignment_P, t * k - 1)
scale = jnp.where(lay.assignment_P < t * k, w.reshape(-1)[a], 0.0)


def as_u32(rows):
  return jax.lax.bitcast_convert_type(rows.reshape(rows.shape[0], -1, 2), jnp.uint32)


cases = {
  "dispatch: take fill (before)": lambda x: jnp.take(x, source, axis=0, mode="fill", fill_value=0),
  "dispatch: take clip": lambda x: jnp.take(x, source, axis=0, mode="clip"),
  "dispatch: take clip on uint32 pairs": lambda x: jax.lax.bitcast_convert_type(
    jnp.take(as_u32(x), source, axis=0, mode="clip"), jnp.bfloat16).reshape(p, d),
  "dispatch: gather kernel": lambda x: gather_rows(x, source),
  "combine bwd: take of dout * w (before)": lambda x: jnp.take(
    (x[:, None, :] * w[..., None].astype(x.dtype)).reshape(t * k, d), lay.assignment_P, axis=0, mode="fill",
    fill_value=0),
  "combine bwd: take_rows scaled": lambda x: take_rows(x, a // k, scale),
  "combine bwd: gather kernel scaled": lambda x: gather_rows(x, a // k, scale),
}
print(f"| gather ({t} tokens x {k}, {p} rows of {d} bf16) | ms | GB/s (rows written + read) |")
print("|---|---|---|")
bytes_moved = 2 * p * d * 2
for name, fn in cases.items():
  f = jax.jit(fn)
  jax.block_until_ready(f(x))
  for _ in range(3):
    jax.block_until_ready(f(x))
  ms, _ = waited_and_back_to_back_ms(lambda: f(x), jax.block_until_ready, 20)
  print(f"| {name} | {ms:.3f} | {bytes_moved / ms / 1e6:.0f} |", flush=True)
