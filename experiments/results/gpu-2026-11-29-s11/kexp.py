"""Session 11 one-off: device time of each kernel of tiled_swiglu fwd+bwd, tile variants, and gathers."""
import sys
sys.path.insert(0, "experiments")
import numpy as np, jax, jax.numpy as jnp
from bench_moe import make_data
from timing import waited_and_back_to_back_ms
from esft_jax.model.kernels import tiled
from esft_jax.model.kernels.layout import dispatch
from esft_jax.model.kernels.tiled import TileConfig, grouped_forward, grouped_weight_grad

D, F = 2048, 1408
which = sys.argv[1] if len(sys.argv) > 1 else "kernels"


def bench(fn, *args, iters=20):
  c = jax.jit(fn).lower(*args).compile()
  for _ in range(3):
    jax.block_until_ready(c(*args))
  ms, _ = waited_and_back_to_back_ms(lambda: c(*args), jax.block_until_ready, iters)
  return ms, c(*args)


def err(a, b):
  a, b = [np.asarray(jnp.asarray(v, jnp.float32)) for v in (a, b)]
  return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-9))


def swiglu_operands(rows, skewed):
  """Group sizes, real rows, dispatched x and dy, and the gate, up and down stacks of one benchmark case."""
  data = make_data(rows, 6, 64, D, F, skewed, seed=rows + skewed)
  lay = data["layouts"][128]
  e = data["experts"]
  return (lay.group_sizes_G, data["rows"], dispatch(data["x"], lay), dispatch(data["cotangent"], lay),
          e["gate_proj"], e["up_proj"], e["down_proj"])


def kernels(rows, skewed):
  gs, real, x, dy, gate, up, down = swiglu_operands(rows, skewed)
  fwd = lambda cfg, ep="products", t=False, sides=(): (
    lambda a, b, g, *s: grouped_forward(a, b, g, transpose_rhs=t, cfg=cfg, epilogue=ep, sides=s))
  out = []

  def row(name, cfg, flops, fn, *args, ref=None):
    try:
      ms, val = bench(fn, *args)
      e_ = "" if ref is None else f"{err(val[0] if isinstance(val, tuple) else val, ref):.1e}"
      out.append(f"| {rows} {'skew' if skewed else 'even'} | {name} | {cfg} | {ms:.3f} | {flops / ms / 1e9:.1f} | {e_} |")
    except Exception as ex:
      out.append(f"| {rows} | {name} | {cfg} | failed | {type(ex).__name__}: {str(ex).splitlines()[0][:150]} | |")
    print(out[-1], flush=True)
    return None

  mm = 2 * real * D * F
  g_, u_, h_ = grouped_forward(x, (gate, up), gs, transpose_rhs=False, cfg=tiled.SHARED_LHS_TILES, epilogue="swiglu")
  row("fwd gate,up +swiglu", "64x128m", 2 * mm, fwd(tiled.SHARED_LHS_TILES, "swiglu"), x, (gate, up), gs)
  row("fwd down", "128x128n", mm, fwd(tiled.forward_config(D)), h_, down, gs)
  cur = TileConfig(64, 128, "m")
  dg, du = grouped_forward(dy, down, gs, transpose_rhs=True, cfg=cur, epilogue="swiglu_grad", sides=(g_, u_))
  for cfg in (cur, TileConfig(64, 256, "m", tile_k=32), TileConfig(128, 128, "n", tile_k=32),
              TileConfig(64, 256, "m", tile_k=32, max_stages=3)):
    row("dX swiglu_grad", cfg, mm, fwd(cfg, "swiglu_grad", True), dy, down, gs, g_, u_, ref=dg)
  dh = grouped_forward(dy, down, gs, transpose_rhs=True, cfg=cur)
  for cfg in (cur, TileConfig(64, 256, "m"), TileConfig(128, 128, "n"), TileConfig(128, 128, "m")):
    row("dX dY@down^T products", cfg, mm, fwd(cfg, "products", True), dy, down, gs, ref=dh)
  dxg = grouped_forward(dg, gate, gs, transpose_rhs=True, cfg=tiled.forward_config(D))
  row("dX dgate@gate^T", "128x128n", mm, fwd(tiled.forward_config(D), "products", True), dg, gate, gs)
  row("dX dup@up^T +add", "128x128n", mm, fwd(tiled.forward_config(D), "add", True), du, up, gs, dxg)
  for k, n, a, b in ((D, F, x, dg), (F, D, h_, dy)):
    for cfg in (tiled.weight_grad_config(k, n), TileConfig(64, 128, "m"), TileConfig(64, 256, "m", grid_tile_width=1),
                TileConfig(128, 128, "n", grid_tile_width=1), TileConfig(128, 128, "m", grid_tile_width=1)):
      if k % cfg.block_m or n % cfg.block_n:
        continue
      row(f"dW {k}x{n}", cfg, mm, lambda a_, b_, g: grouped_weight_grad(a_, b_, g, cfg=cfg), a, b, gs)
  whole = jax.jit(lambda x, g_w, u_w, d_w, c: jax.vjp(lambda *w: tiled.tiled_swiglu(*w, gs), x, g_w, u_w, d_w)[1](c))
  row("whole swiglu fwd+bwd", "-", 9 * mm, lambda x, g_w, u_w, d_w, c: (
    tiled.tiled_swiglu(x, g_w, u_w, d_w, gs), whole(x, g_w, u_w, d_w, c)), x, gate, up, down, dy)


def gathers():
  t, k = 16384, 6
  data = make_data(t * k, k, 64, D, F, False, seed=0)
  lay = data["layouts"][128]
  x = data["x"]
  src = lay.source_P
  p = src.shape[0]
  fill = lambda x, s: jnp.take(x, s, axis=0, mode="fill", fill_value=0)
  padrow = lambda x, s: jnp.take(jnp.concatenate([x, jnp.zeros((1, D), x.dtype)]), s, axis=0, mode="clip")
  clipsel = lambda x, s: jnp.where((s < x.shape[0])[:, None], jnp.take(x, jnp.minimum(s, x.shape[0] - 1), axis=0,
                                                                       mode="clip"), 0)
  ref = fill(x, src)
  for name, fn in (("fill", fill), ("pad row", padrow), ("clip+select", clipsel)):
    ms, v = bench(fn, x, src)
    print(f"| dispatch gather {name} | {ms:.3f} ms | {2 * p * D * 2 / ms / 1e6:.0f} GB/s (r+w) | err {err(v, ref)} |")
  d_PxD = ref
  readers = lay.dest_TxK
  g_sum = lambda d, r: jnp.sum(jnp.take(d, r, axis=0, mode="fill", fill_value=0), axis=1, dtype=jnp.float32).astype(d.dtype)
  ms, _ = bench(g_sum, d_PxD, readers)
  print(f"| dispatch bwd sum (fill) | {ms:.3f} ms | {(t * k + t) * D * 2 / ms / 1e6:.0f} GB/s |")
  # combine backward: rows of d_TxKxD = w * dout, read by assignment_P
  dout, w = data["cotangent"], data["weights"]
  asg = lay.assignment_P
  comb_bwd = lambda dout, w, a: jnp.take((dout[:, None, :] * w[..., None].astype(dout.dtype)).reshape(t * k, D), a,
                                         axis=0, mode="fill", fill_value=0)
  comb_direct = lambda dout, w, a: jnp.where((a < t * k)[:, None], jnp.take(dout, jnp.minimum(a // k, t - 1), axis=0,
                                             mode="clip") * jnp.take(w.reshape(-1), jnp.minimum(a, t * k - 1),
                                             mode="clip")[:, None].astype(dout.dtype), 0)
  ref = None
  for name, fn in (("materialized w*dout, fill", comb_bwd), ("gather dout, scale", comb_direct)):
    ms, v = bench(fn, dout, w, asg)
    ref = v if ref is None else ref
    print(f"| combine bwd {name} | {ms:.3f} ms | {2 * p * D * 2 / ms / 1e6:.0f} GB/s | err {err(v, ref)} |")


def variants(rows, skewed):
  gs, real, x, dy, gate, up, down = swiglu_operands(rows, skewed)
  mm = 2 * real * D * F
  tag = f"{rows} {'skew' if skewed else 'even'}"

  def show(name, ms, flops, extra=""):
    print(f"| {tag} | {name} | {ms:.3f} | {flops / ms / 1e9:.1f} | {extra} |", flush=True)

  def setv(approx, sig):
    tiled._APPROX[0], tiled._SIGMOID[0] = approx, sig
    jax.clear_caches()

  g_, u_, _ = grouped_forward(x, (gate, up), gs, transpose_rhs=False, cfg=tiled.SHARED_LHS_TILES, epilogue="swiglu")
  cur = TileConfig(64, 128, "m")
  ms, _ = bench(lambda a, b, c, g: grouped_forward(a, (b, c), g, transpose_rhs=False, cfg=tiled.SHARED_LHS_TILES), x, gate, up, gs)
  show("fwd gate,up products only", ms, 2 * mm)
  refs = {}
  for approx, sig in ((False, tiled._sigmoid_div), (True, tiled._sigmoid_div), (True, tiled._sigmoid_rsqrt),
                      (False, tiled._sigmoid_rsqrt)):
    setv(approx, sig)
    name = f"approx={approx} {sig.__name__}"
    ms, v = bench(lambda a, b, c, g: grouped_forward(a, (b, c), g, transpose_rhs=False, cfg=tiled.SHARED_LHS_TILES,
                                                      epilogue="swiglu"), x, gate, up, gs)
    refs.setdefault("f", v[2])
    show(f"fwd gate,up +swiglu {name}", ms, 2 * mm, f"err {err(v[2], refs['f']):.1e}")
    ms, v = bench(lambda a, b, g, s1, s2: grouped_forward(a, b, g, transpose_rhs=True, cfg=cur, epilogue="swiglu_grad",
                                                          sides=(s1, s2)), dy, down, gs, g_, u_)
    refs.setdefault("b", v[0])
    show(f"dX swiglu_grad {name}", ms, mm, f"err {err(v[0], refs['b']):.1e}")
  setv(True, tiled._sigmoid_rsqrt)
  wide = TileConfig(64, 256, "m")
  dg, du = grouped_forward(dy, down, gs, transpose_rhs=True, cfg=cur, epilogue="swiglu_grad", sides=(g_, u_))
  h_ = grouped_forward(x, (gate, up), gs, transpose_rhs=False, cfg=tiled.SHARED_LHS_TILES, epilogue="swiglu")[2]
  dxg = grouped_forward(dg, gate, gs, transpose_rhs=True, cfg=tiled.forward_config(D))
  for cfg in (tiled.forward_config(D), wide):
    ms, _ = bench(lambda a, b, g: grouped_forward(a, b, g, transpose_rhs=False, cfg=cfg), h_, down, gs)
    show(f"fwd down {cfg.tile_m}x{cfg.tile_n}{cfg.split}", ms, mm)
    ms, _ = bench(lambda a, b, g: grouped_forward(a, b, g, transpose_rhs=True, cfg=cfg), dg, gate, gs)
    show(f"dX dgate {cfg.tile_m}x{cfg.tile_n}{cfg.split}", ms, mm)
    ms, _ = bench(lambda a, b, g, s: grouped_forward(a, b, g, transpose_rhs=True, cfg=cfg, epilogue="add", sides=(s,)),
                  du, up, gs, dxg)
    show(f"dX dup+add {cfg.tile_m}x{cfg.tile_n}{cfg.split}", ms, mm)
  ref = None
  for cfg in (tiled.weight_grad_config(D, F), TileConfig(64, 256, "m", grid_tile_width=1)):
    ms, v = bench(lambda a, b, g: grouped_weight_grad(a, b, g, cfg=cfg), x, dg, gs)
    ref = v if ref is None else ref
    show(f"dW {D}x{F} {cfg.tile_m}x{cfg.tile_n}{cfg.split}", ms, mm, f"err {err(v, ref):.1e}")


def whole(rows_list):
  base_fc, base_wc = tiled.forward_config, tiled.weight_grad_config
  wide = TileConfig(64, 256, "m")
  combos = {
    "current": (False, tiled._sigmoid_div, base_fc, base_wc),
    "approx+rsqrt": (True, tiled._sigmoid_rsqrt, base_fc, base_wc),
    "+dW 64x256m (n%256)": (True, tiled._sigmoid_rsqrt, base_fc,
                            lambda k, n: TileConfig(64, 256, "m", grid_tile_width=1) if n % 256 == 0 else base_wc(k, n)),
    "+dW 64x256m all": (True, tiled._sigmoid_rsqrt, base_fc, lambda k, n: TileConfig(64, 256, "m", grid_tile_width=1)),
    "+fwd 64x256m": (True, tiled._sigmoid_rsqrt, lambda n, slots=1: wide if slots == 1 and n % 256 == 0 else base_fc(n, slots),
                     lambda k, n: TileConfig(64, 256, "m", grid_tile_width=1) if n % 256 == 0 else base_wc(k, n)),
  }
  for rows, skewed in rows_list:
    data = make_data(rows, 6, 64, D, F, skewed, seed=rows + skewed)
    lay = data["layouts"][128]
    gs = lay.group_sizes_G
    x, dy = dispatch(data["x"], lay), dispatch(data["cotangent"], lay)
    e = data["experts"]
    for name, (approx, sig, fc, wc) in combos.items():
      tiled._APPROX[0], tiled._SIGMOID[0], tiled.forward_config, tiled.weight_grad_config = approx, sig, fc, wc
      jax.clear_caches()
      def step(x, g_w, u_w, d_w, c):
        y, vjp = jax.vjp(lambda *w: tiled.tiled_swiglu(*w, gs), x, g_w, u_w, d_w)
        return y, vjp(c)
      try:
        ms, _ = bench(step, x, e["gate_proj"], e["up_proj"], e["down_proj"], dy)
        print(f"| {rows} {'skew' if skewed else 'even'} | whole fwd+bwd {name} | {ms:.3f} | "
              f"{18 * data['rows'] * D * F / ms / 1e9:.1f} |", flush=True)
      except Exception as ex:
        print(f"| {rows} | whole {name} | failed {type(ex).__name__}: {str(ex)[:200]} |", flush=True)


print(f"# jax {jax.__version__} {jax.devices()[0].device_kind}", flush=True)
if which == "gathers":
  gathers()
elif which == "variants":
  for r in (65536, 16384):
    variants(r, False)
elif which == "whole":
  whole([(65536, False), (16384, False), (32768, False), (65536, True), (16384, True), (32768, True)])
else:
  for r, s in ((65536, False), (16384, False), (32768, False), (65536, True)):
    kernels(r, s)
