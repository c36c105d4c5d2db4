"""Routed-expert SwiGLU, forward and forward+backward: the JAX paths and PyTorch's grouped GEMM, in one process.

    python experiments/bench_moe.py           # GPU: 64 experts, 2048 -> 1408 -> 2048, 16k-64k rows, bf16
    python experiments/bench_moe.py --paths tiled,torch   # skip the slow paths
    python experiments/bench_moe.py --tiny    # a few seconds on CPU (CI keeps it working)
    python experiments/bench_moe.py --sweep   # GPU: times tile configurations of the "tiled" kernels
    python experiments/bench_moe.py --rows 65536 --paths tiled --profile /tmp/moe   # + device time by kernel

Ops: "swiglu" is the three grouped matmuls on rows already grouped by expert (padded per expert for "tiled");
"moe" is the whole `expert_ffn(x, ids, weights, experts)` (dispatch, matmuls, weighted combine).
Paths: grouped (`jax.lax.ragged_dot`), ragged (jax's Mosaic GPU ragged-dot kernels), tiled (our Mosaic GPU
kernels), torch (`torch._grouped_mm`, PyTorch's reference). FLOPs count the matmuls on the real rows only:
6*rows*d*f forward, 18*rows*d*f forward+backward. Time ("ms", and TFLOP/s from it): the mean of --iters runs back
to back after --warmup, as a training loop runs them (experiments/timing.py); "waited ms" is the median of --iters
runs each waited for (block_until_ready / torch.cuda.synchronize), which adds the host's launch and sync of every
call (about 1 ms per SwiGLU fwd+bwd at 65k rows for JAX on an H200, 2026-11-29). Peak: memory beyond the inputs,
from XLA's memory analysis of the compiled step (temporaries + outputs) and from torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from esft_jax.cli import at_least_one
from esft_jax.model.experts import expert_ffn
from esft_jax.model.kernels import hopper_available
from esft_jax.model.kernels.layout import expert_layout
from timing import waited_and_back_to_back_ms
from trace_summary import NO_KERNELS, device_lines, hlo_op_names, kernel_events, load_trace, ms_by, op_path

PATHS = ("grouped", "ragged", "tiled", "torch")
GIB = 2.0**30


def routing(tokens: int, k: int, experts: int, skewed: bool, rng: np.random.Generator) -> np.ndarray:
  """Top-k expert ids [tokens, k], distinct per token: round-robin (even), or expert popularity ~ Dirichlet(0.5)."""
  if not skewed:
    return (np.arange(tokens * k) % experts).reshape(tokens, k).astype(np.int32)
  popularity = rng.dirichlet(np.full(experts, 0.5))
  gumbel_TxE = np.log(popularity + 1e-30) - np.log(-np.log(rng.random((tokens, experts))))
  return np.argsort(-gumbel_TxE, axis=1)[:, :k].astype(np.int32)


def swiglu_jax(matmul: Callable) -> Callable:
  """The SwiGLU on grouped rows from three grouped matmuls, the SiLU apart."""
  def swiglu(x_PxD, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, group_sizes_E):
    gate_PxF, up_PxF = (matmul(x_PxD, w, group_sizes_E) for w in (w_gate_ExDxF, w_up_ExDxF))
    return matmul(jax.nn.silu(gate_PxF) * up_PxF, w_down_ExFxD, group_sizes_E)

  return swiglu


def with_backward(fn: Callable, num_diff: int) -> Callable:
  """fn's output and the gradients of <output, cotangent> with respect to its first num_diff arguments."""

  def step(cotangent, *args):
    out, vjp = jax.vjp(lambda *diff: fn(*diff, *args[num_diff:]), *args[:num_diff])
    return out, vjp(cotangent.astype(out.dtype))

  return step


def time_jax(fn: Callable, args: tuple, warmup: int, iters: int, trace_dir: str | None = None) -> tuple:
  """ms back to back, ms waited for (see timing.waited_and_back_to_back_ms) and peak GiB beyond the inputs of
  jit(fn)(*args); with `trace_dir`, also its device ms per call by kernel (see kernel_ms)."""
  compiled = jax.jit(fn).lower(*args).compile()
  memory = compiled.memory_analysis()
  peak = (memory.temp_size_in_bytes + memory.output_size_in_bytes) / GIB if memory is not None else float("nan")
  run = lambda: compiled(*args)
  for _ in range(warmup):
    jax.block_until_ready(run())
  kernels = kernel_ms(compiled, args, trace_dir) if trace_dir else None
  return *waited_and_back_to_back_ms(run, jax.block_until_ready, iters), peak, kernels


def kernel_ms(compiled, args: tuple, trace_dir: str, calls: int = 5) -> list[tuple[str, float]]:
  """Device ms per call of each kernel of compiled(*args) (traced over `calls` calls), with the JAX operation it
  comes from (its name stack in the compiled HLO), longest first."""
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(calls):
      jax.block_until_ready(compiled(*args))
  op_names = hlo_op_names(compiled.as_text())
  kernels = kernel_events(device_lines(load_trace(trace_dir)))
  return ms_by(kernels, calls, lambda event: f"{event['name'][:40]} | {op_path(event, op_names)[-100:]}")


def time_torch(fn: Callable, warmup: int, iters: int) -> tuple[float, float, float]:
  """As time_jax, for a torch step on the GPU (peak: torch.cuda.max_memory_allocated beyond what was allocated)."""
  import torch

  for _ in range(warmup):
    fn()
  torch.cuda.synchronize()
  base = torch.cuda.memory_allocated()
  torch.cuda.reset_peak_memory_stats()
  fn()
  torch.cuda.synchronize()
  peak = (torch.cuda.max_memory_allocated() - base) / GIB
  return *waited_and_back_to_back_ms(fn, lambda _: torch.cuda.synchronize(), iters), peak


class TorchCase:
  """The same op in PyTorch on the GPU: torch._grouped_mm on weights stored [E, out, in] (as transformers does)."""

  def __init__(self, x_TxD, ids_TxK, weights_TxK, experts, cotangent_TxD):
    import torch

    self.torch = torch
    dev = "cuda"
    bf16 = lambda a, grad=True: torch.from_numpy(np.asarray(a, np.float32)).to(dev, torch.bfloat16).requires_grad_(grad)
    self.x_TxD = bf16(x_TxD)
    self.ids_TxK = torch.from_numpy(np.asarray(ids_TxK)).to(dev, torch.int64)
    self.weights_TxK = bf16(weights_TxK)
    self.w_out_in = {n: bf16(np.swapaxes(np.asarray(w, np.float32), 1, 2)) for n, w in experts.items()}
    self.cotangent_TxD = bf16(cotangent_TxD, grad=False)
    flat = self.ids_TxK.reshape(-1)
    order = torch.argsort(flat, stable=True)
    self.offsets = torch.cumsum(torch.bincount(flat, minlength=experts["gate_proj"].shape[0]), 0).to(torch.int32)
    self.x_sorted = self.x_TxD.detach()[order // ids_TxK.shape[1]].requires_grad_(True)
    self.cotangent_sorted = torch.randn_like(self.x_sorted, requires_grad=False)

  def _swiglu(self, x_sorted, offsets):
    mm = lambda a, name: self.torch._grouped_mm(a, self.w_out_in[name].transpose(-2, -1), offs=offsets)
    return mm(self.torch.nn.functional.silu(mm(x_sorted, "gate_proj")) * mm(x_sorted, "up_proj"), "down_proj")

  def _moe(self):
    torch = self.torch
    t, k = self.ids_TxK.shape
    flat = self.ids_TxK.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offsets = torch.cumsum(torch.bincount(flat, minlength=self.offsets.shape[0]), 0).to(torch.int32)
    y_sorted = self._swiglu(self.x_TxD[order // k], offsets)
    y_TxKxD = torch.empty_like(y_sorted).index_copy(0, order, y_sorted).view(t, k, -1)
    return (y_TxKxD * self.weights_TxK[..., None]).sum(1)

  def step(self, op: str, backward: bool) -> Callable:
    leaves = [self.x_TxD, self.x_sorted, self.weights_TxK, *self.w_out_in.values()]

    def run():
      out = self._swiglu(self.x_sorted, self.offsets) if op == "swiglu" else self._moe()
      if backward:
        out.backward(self.cotangent_sorted if op == "swiglu" else self.cotangent_TxD)
        for leaf in leaves:
          leaf.grad = None
      return out

    if not backward:
      return lambda: self.torch.no_grad()(run)()
    return run


def torch_unavailable() -> str | None:
  """Why the torch column is empty, or None."""
  try:
    import torch
  except ImportError:
    return "torch is not installed"
  if not torch.cuda.is_available():
    return "no CUDA device for torch (torch._grouped_mm needs one)"
  if not hasattr(torch, "_grouped_mm"):
    return f"torch {torch.__version__} has no torch._grouped_mm"
  return None


def jax_unavailable(path: str) -> str | None:
  if path in ("ragged", "tiled") and not hopper_available():
    return f"the {path} kernels need a Hopper GPU (found {jax.devices()[0].platform})"
  return None


def jax_step(path: str, op: str, backward: bool, data: dict, one_op: bool = True) -> tuple[Callable, tuple]:
  """The function to jit and its arguments for one path, op and pass."""
  e = data["experts"]
  weights = (e["gate_proj"], e["up_proj"], e["down_proj"])
  if op == "moe":
    from esft_jax.model.kernels.ffn import gpu_expert_ffn

    # The ids are an argument, as the router computes them in a model: closed over, XLA folds the dispatch's
    # constant parts (the group sizes) at compile time and the timing leaves them out.
    def fn(x_TxD, weights_TxK, w_gate, w_up, w_down, ids_TxK):
      experts = {"gate_proj": w_gate, "up_proj": w_up, "down_proj": w_down}
      if path == "grouped":
        return expert_ffn(x_TxD, ids_TxK, weights_TxK, experts, "grouped")
      return gpu_expert_ffn(x_TxD, ids_TxK, weights_TxK, experts, path)

    args, num_diff, cotangent = (data["x"], data["weights"], *weights, data["ids"]), 5, data["cotangent"]
  else:
    from esft_jax.model.kernels.ffn import kernel_ops

    if path == "grouped":
      fn, align = swiglu_jax(jax.lax.ragged_dot), 1
    else:
      ops = kernel_ops(path)
      fn, align = (ops.swiglu if one_op else swiglu_jax(ops.matmul)), ops.align
    source_P = data["layouts"][align].source_P
    rows = lambda a: jnp.take(a, source_P, axis=0, mode="fill", fill_value=0)
    args, num_diff = (rows(data["x"]), *weights, data["layouts"][align].group_sizes_G), 4
    cotangent = rows(data["cotangent"])
  return (with_backward(fn, num_diff), (cotangent, *args)) if backward else (fn, args)


def make_data(rows: int, k: int, experts: int, d: int, f: int, skewed: bool, seed: int) -> dict:
  from esft_jax.model.kernels.tiled import ALIGN

  rng = np.random.default_rng(seed)
  tokens = max(8, round(rows / k / 8) * 8)
  ids = routing(tokens, k, experts, skewed, rng)
  normal = lambda *shape: rng.standard_normal(shape, np.float32)
  expert_weights = {
    "gate_proj": normal(experts, d, f) / np.sqrt(d),
    "up_proj": normal(experts, d, f) / np.sqrt(d),
    "down_proj": normal(experts, f, d) / np.sqrt(f),
  }
  gates = rng.random((tokens, k), np.float32)
  host = dict(x=normal(tokens, d), ids=ids, weights=gates / gates.sum(1, keepdims=True), cotangent=normal(tokens, d))
  bf16 = lambda a: jnp.asarray(a, jnp.bfloat16)
  ids_jax = jnp.asarray(ids)
  return dict(
    host=dict(host, experts=expert_weights),
    x=bf16(host["x"]),
    ids=ids_jax,
    weights=jnp.asarray(host["weights"]),
    cotangent=bf16(host["cotangent"]),
    experts={n: bf16(w) for n, w in expert_weights.items()},
    layouts={align: expert_layout(ids_jax, experts, align) for align in (1, ALIGN)},
    rows=tokens * k,
  )


def run_table(args) -> dict[str, str | None]:
  """Prints the table a row at a time (then, with --profile, device time by kernel); returns why paths were not
  measured."""
  profiles = []
  rows_list = [int(r) for r in args.rows.split(",")]
  paths = args.paths.split(",")
  unknown = sorted(set(paths) - set(PATHS))
  if unknown:
    raise SystemExit(f"--paths: unknown path(s) {unknown}; choose from {list(PATHS)}")
  notes = {p: torch_unavailable() if p == "torch" else jax_unavailable(p) for p in PATHS if p in paths}
  print_row(["op", "pass", "rows", "routing", "path", "ms", "TFLOP/s", "waited ms", "peak GiB", "vs torch"])
  print("|" + "---|" * 10, flush=True)
  for rows in rows_list:
    for skewed in (False, True):
      data = make_data(rows, args.top_k, args.experts, args.d, args.f, skewed, seed=rows + skewed)
      torch_case = None
      if "torch" in notes and notes["torch"] is None:
        h = data["host"]
        torch_case = TorchCase(h["x"], h["ids"], h["weights"], h["experts"], h["cotangent"])
      for op in ("swiglu", "moe"):
        for backward in (False, True):
          flops = (18 if backward else 6) * data["rows"] * args.d * args.f
          results = {}
          for path in notes:
            if notes[path] is not None:
              continue
            try:
              if path == "torch":
                results[path] = time_torch(torch_case.step(op, backward), args.warmup, args.iters)
              else:
                fn, fn_args = jax_step(path, op, backward, data, args.swiglu == "one-op")
                case = f"{op}_{'fwd+bwd' if backward else 'fwd'}_{data['rows']}_{'skewed' if skewed else 'even'}"
                trace_dir = os.path.join(args.profile, f"{path}_{case}") if args.profile else None
                results[path] = time_jax(fn, fn_args, args.warmup, args.iters, trace_dir)
                if results[path][3] is not None:
                  profiles.append((f"{path} {case.replace('_', ' ')}", results[path][3]))
            except Exception as err:  # a path that fails to build or run is reported, not fatal
              notes[path] = error_line(err)[:200]
              print(f"# {path} failed on {op} rows={rows}: {notes[path]}", file=sys.stderr, flush=True)
          torch_ms = results.get("torch", (None,))[0]
          for path, (ms, waited_ms, peak, *_) in results.items():
            print_row([
              op, "fwd+bwd" if backward else "fwd", f"{data['rows']}", "skewed" if skewed else "even", path,
              f"{ms:.3f}", f"{flops / ms / 1e9:.1f}", f"{waited_ms:.3f}", f"{peak:.2f}",
              f"{torch_ms / ms:.2f}" if torch_ms else "-",
            ])
  for label, kernels in profiles:
    if not kernels:
      print(f"# {label}: {NO_KERNELS}")
      continue
    print(f"\n# {label}: {sum(ms for _, ms in kernels):.3f} ms of device time per call\n")
    print_row(["kernel", "operation", "ms per call"])
    print("|---|---|---|")
    for kernel, ms in kernels[:12]:
      print(f"| {kernel} | {ms:.3f} |")
  return notes


def error_line(err: Exception) -> str:
  return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"


def print_row(cells: list[str]) -> None:
  print("| " + " | ".join(cells) + " |", flush=True)


def sweep(args) -> None:
  """Times each tile configuration of the "tiled" kernels on the benchmark widths (even routing, first --rows):
  each kernel alone, --iters calls back to back, in --rounds rounds that visit every configuration in turn, so that
  a drift of the machine reaches all alike. Such kernels of 0.2-0.4 ms can time up to 20% apart in two single runs
  of one configuration: compare medians, and mind the spread."""
  from esft_jax.model.kernels import ragged, tiled
  from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu

  data = make_data(int(args.rows.split(",")[0]), args.top_k, args.experts, args.d, args.f, False, seed=0)
  layout = data["layouts"][tiled.ALIGN]
  gs = layout.group_sizes_G
  rng = np.random.default_rng(1)
  normal = lambda *shape, scale=1.0: jnp.asarray(scale * rng.standard_normal(shape), jnp.bfloat16)
  forward = lambda cfg, transpose, epilogue="products": lambda a, b, g, *sides: tiled.grouped_forward(
    a, b, g, transpose_rhs=transpose, cfg=cfg, epilogue=epilogue, sides=sides)
  weight_grad = lambda cfg: lambda a, b, g: tiled.grouped_weight_grad(a, b, g, cfg=cfg)
  cases = []  # (kernel, config, flops, fn, its arguments)
  for d_to_f, (k, n) in zip((True, False), ((args.d, args.f), (args.f, args.d))):
    lhs = jnp.where((layout.source_P < data["x"].shape[0])[:, None], normal(layout.source_P.shape[0], k), 0)
    dout = normal(lhs.shape[0], n)
    w = normal(args.experts, k, n, scale=k ** -0.5)
    flops = 2 * data["rows"] * k * n
    for cfg in forward_candidates():
      cases.append((f"fwd {k}->{n}", cfg, flops, forward(cfg, False), (lhs, w, gs)))
      cases.append((f"dX {n}->{k}", cfg, flops, forward(cfg, True), (dout, w, gs)))
    for cfg in weight_grad_candidates(k):
      cases.append((f"dW {k}x{n}", cfg, flops, weight_grad(cfg), (lhs, dout, gs)))
    shipped = lambda a, b, g: transposed_ragged_dot_mgpu.transposed_ragged_dot(a, b, group_sizes=g, **ragged.BLOCKS)
    cases.append((f"dW {k}x{n}", "jax transposed_ragged_dot", flops, shipped, (lhs, dout, gs)))
    # The kernels as the SwiGLU runs them: gate and up in one kernel, forward (two products of one lhs) and x's
    # input gradient (one sum of two terms); down's input gradient makes dgate and dup in its epilogue.
    if d_to_f:
      stacks, douts = (w, normal(args.experts, k, n, scale=k ** -0.5)), (dout, normal(lhs.shape[0], n))
      for cfg in shared_lhs_candidates():
        cases.append((f"fwd gate,up {k}->{n} +swiglu", cfg, 2 * flops, forward(cfg, False, "swiglu"),
                      (lhs, stacks, gs)))
      for cfg in forward_candidates():
        cases.append((f"dX gate,up {n}->{k} terms", cfg, 2 * flops, forward(cfg, True), (douts, stacks, gs)))
    else:
      sides = tuple(normal(lhs.shape[0], k) for _ in range(2))
      for cfg in forward_candidates():
        cases.append((f"dX {n}->{k} +swiglu_grad", cfg, flops, forward(cfg, True, "swiglu_grad"),
                      (dout, w, gs, *sides)))
  names = sorted({case[0] for case in cases})
  cases = [case for case in cases if args.kernels in case[0]]
  if not cases:
    raise SystemExit(f"--kernels {args.kernels!r} matches none of the kernels: {', '.join(names)}")
  compiled = []
  for name, cfg, _, fn, fn_args in cases:
    try:
      compiled.append(jax.jit(fn).lower(*fn_args).compile())
    except Exception as err:
      compiled.append(err)
      print(f"# {name} {cfg}: {error_line(err)}", file=sys.stderr, flush=True)
  case_ms = [[] for _ in cases]
  for round_ in range(args.rounds):
    for i, (name, cfg, _, _, fn_args) in enumerate(cases):
      if isinstance(compiled[i], Exception):
        continue
      run = lambda: compiled[i](*fn_args)
      try:
        for _ in range(args.warmup):
          jax.block_until_ready(run())
        case_ms[i].append(waited_and_back_to_back_ms(run, jax.block_until_ready, args.iters)[0])
        print(f"# round {round_ + 1}: {name} {cfg}: {case_ms[i][-1]:.3f} ms", file=sys.stderr, flush=True)
      except Exception as err:  # a launch that fails: the case is dropped from later rounds, the others go on
        compiled[i] = err
        print(f"# round {round_ + 1}: {name} {cfg}: {error_line(err)}", file=sys.stderr, flush=True)
  print(f"rows={data['rows']} (padded {layout.source_P.shape[0]}), TFLOP/s on real rows; ms: the median of "
        f"{args.rounds} rounds of {args.iters} calls back to back, and their range")
  print_row(["kernel", "config", "ms", "range ms", "TFLOP/s"])
  print("|" + "---|" * 5)
  for (name, cfg, flops, _, _), exe, ms in zip(cases, compiled, case_ms):
    if isinstance(exe, Exception):
      print_row([name, str(cfg), "failed", error_line(exe)[:120], ""])
    else:
      median = float(np.median(ms))
      print_row([name, str(cfg), f"{median:.3f}", f"{min(ms):.3f}-{max(ms):.3f}", f"{flops / median / 1e9:.1f}"])


def forward_candidates() -> list:
  """Candidate tiles for a forward-style kernel of any output width: the last column tile may run past it.
  store_n: outputs (and side arrays) staged in pieces, so that more pipeline stages fit. "pingpong": each compute
  warpgroup its own blocks, in turn, so that one's epilogue overlaps the other's mainloop."""
  from esft_jax.model.kernels.tiled import TileConfig

  cooperative = [TileConfig(64, 128, "m"), TileConfig(64, 256, "m"), TileConfig(128, 128, "n", store_n=16),
                 TileConfig(64, 256, "m", store_n=64)]
  # max_stages=8: as many stages as fit beside the staging
  pingpong = [TileConfig(128, 128, "pingpong", store_n=32, max_stages=8),
              TileConfig(128, 128, "pingpong", store_n=16, max_stages=8),
              TileConfig(64, 256, "pingpong", store_n=32, max_stages=8)]
  return cooperative + pingpong


def shared_lhs_candidates() -> list:
  """Candidate tiles for gate and up in one kernel (two fp32 accumulators per warpgroup, so ping-pong blocks are
  64 x 128 or 128 x 64 at most)."""
  from esft_jax.model.kernels.tiled import SHARED_LHS_TILES, TileConfig

  return [SHARED_LHS_TILES, dataclasses.replace(SHARED_LHS_TILES, store_n=32),
          TileConfig(128, 64, "pingpong", store_n=16, max_stages=8)]


def weight_grad_candidates(k: int) -> list:
  """Candidate tiles for a weight gradient [k, n]: blocks must divide k; the last column tile may run past n (256-wide
  blocks on width 1408)."""
  from esft_jax.model.kernels.tiled import WEIGHT_GRAD_TILES, TileConfig

  candidates = [WEIGHT_GRAD_TILES, TileConfig(64, 256, "m", grid_tile_width=1),
                TileConfig(128, 128, "n", grid_tile_width=1),
                TileConfig(128, 128, "pingpong", grid_tile_width=1, store_n=16, max_stages=8),
                TileConfig(64, 256, "pingpong", grid_tile_width=1, store_n=32, max_stages=8)]
  return [c for c in candidates if k % c.block_m == 0]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true", help="tiny shapes for a CPU smoke run")
  parser.add_argument("--swiglu", choices=("one-op", "matmuls"), default="one-op",
                      help='"swiglu" op of the kernel paths: the family\'s one SwiGLU op, as the model runs it (on '
                           '"tiled": gate and up in one kernel, the SiLU and its gradient in kernel epilogues), or '
                           'three grouped matmuls and the SiLU apart, to compare the two side by side')
  parser.add_argument("--sweep", action="store_true", help="time tile configurations of the tiled kernels")
  parser.add_argument("--kernels", default="", metavar="TEXT",
                      help="--sweep: only the kernels whose name contains TEXT as a substring (e.g. "
                           "'+swiglu_grad'; names as in the sweep's table)")
  parser.add_argument("--profile", metavar="DIR",
                      help="also trace 5 calls of each JAX path and op into DIR and print their device time per "
                           "call by kernel, after the table (XLA's command buffers are turned off for the run, so "
                           "that each kernel names its operation)")
  parser.add_argument("--rows", default="16384,32768,65536", help="tokens x top-k, comma-separated")
  parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of " + ",".join(PATHS))
  parser.add_argument("--top-k", type=int, default=6)
  parser.add_argument("--experts", type=int, default=64)
  parser.add_argument("--d", type=int, default=2048)
  parser.add_argument("--f", type=int, default=1408)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--iters", type=at_least_one, default=10)
  parser.add_argument("--rounds", type=at_least_one, default=3,
                      help="--sweep: rounds over all configurations (see sweep)")
  args = parser.parse_args()
  if args.kernels and not args.sweep:
    parser.error("--kernels picks kernels of --sweep; add --sweep")
  if args.tiny:
    args.rows, args.top_k, args.experts, args.d, args.f, args.warmup, args.iters = "96", 2, 4, 128, 128, 1, 2
  if args.profile:  # read when the backend starts (below)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()
  print(f"# jax {jax.__version__} on {jax.devices()[0].device_kind}; experts={args.experts} d={args.d} f={args.f} "
        f"top_k={args.top_k} bf16", flush=True)
  if args.sweep:
    sweep(args)
    return
  try:
    import torch

    print(f"# torch {torch.__version__}")
  except ImportError:
    pass
  notes = run_table(args)
  for path, note in notes.items():
    if note is not None:
      print(f"- {path}: not measured: {note}")


if __name__ == "__main__":
  main()
