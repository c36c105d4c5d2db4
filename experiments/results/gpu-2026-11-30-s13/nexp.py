"""One-off (session 13): a decoder layer's residual add + RMSNorm, forward and backward, at [8, 2048, 2048] bf16:
autodiff of the model's formula against a written-out VJP that saves only 1/rms per row. (Call 1 ran it with the
VJP in esft_jax.model.layers; it gained nothing and was not kept, so it lives here now.)

    PYTHONPATH=. python3 experiments/results/gpu-2026-11-30-s13/nexp.py
"""

import functools

import jax
import jax.numpy as jnp

from experiments.timing import waited_and_back_to_back_ms


def autodiff_norm(x, scale, eps):
  x32 = x.astype(jnp.float32)
  normed = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)
  return scale.astype(x.dtype) * normed


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x, scale, eps):
  return _rms_norm_forward(x, scale, eps)[0]


def _rms_norm_forward(x, scale, eps):
  x32 = x.astype(jnp.float32)
  inv_rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return scale.astype(x.dtype) * (x32 * inv_rms).astype(x.dtype), (x, scale, inv_rms)


def _rms_norm_backward(eps, residuals, dout):
  x, scale, inv_rms = residuals
  x32 = x.astype(jnp.float32)
  dnormed = (dout * scale.astype(dout.dtype)).astype(jnp.float32)
  dx = inv_rms * (dnormed - x32 * (inv_rms * inv_rms) * jnp.mean(dnormed * x32, axis=-1, keepdims=True))
  normed = (x32 * inv_rms).astype(x.dtype)
  dscale = jnp.sum((dout * normed).astype(jnp.float32), axis=tuple(range(x.ndim - 1)))
  return dx.astype(x.dtype), dscale.astype(scale.dtype)


rms_norm.defvjp(_rms_norm_forward, _rms_norm_backward)


def residual_block(norm):
  def block(x, update, scale):
    residual = x + update
    return residual, norm(residual, scale, 1e-6)

  def step(x, update, scale, d_residual, d_normed):  # as in training: the norm's scale frozen
    out, vjp = jax.vjp(lambda x, update: block(x, update, scale), x, update)
    return out, vjp((d_residual, d_normed))

  return jax.jit(step)


keys = jax.random.split(jax.random.key(0), 5)
shape = (8, 2048, 2048)
x, update, d_residual, d_normed = (jax.random.normal(k, shape, jnp.bfloat16) for k in keys[:4])
scale = 1 + 0.1 * jax.random.normal(keys[4], (shape[-1],), jnp.float32)
args = (x, update, scale, d_residual, d_normed)
# bytes a fused kernel set must move at least: reads x, update, d_residual, d_normed; writes residual, normed, dx
floor_bytes = 7 * x.size * 2
print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; shape {shape} bf16")
print("| norm | ms (fwd+bwd) | GB/s at the 7-array floor | kernels |")
print("|---|---|---|---|")
for name, norm in (("autodiff", autodiff_norm), ("written-out VJP", rms_norm)):
  fn = residual_block(norm)
  hlo = fn.lower(*args).compile().as_text()
  kernels = hlo.count(" fusion(") + hlo.count("custom-call(")
  jax.block_until_ready(fn(*args))
  ms, _ = waited_and_back_to_back_ms(lambda: fn(*args), jax.block_until_ready, iters=100)  # back to back
  print(f"| {name} | {ms:.3f} | {floor_bytes / ms / 1e6:.0f} | {kernels} |")
a = residual_block(autodiff_norm)(*args)
b = residual_block(rms_norm)(*args)
err = [float(jnp.max(jnp.abs(p.astype(jnp.float32) - q.astype(jnp.float32)))) for p, q in
       zip(jax.tree.leaves(a), jax.tree.leaves(b))]
print("max abs differences (residual, normed, dx, dupdate):", err)
