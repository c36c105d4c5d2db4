"""ESFT training-step throughput: each JAX expert path and the PyTorch reference, on a DeepSeek-V2-Lite-shaped
model, in one invocation and one table.

    python experiments/bench_train.py --layers 8 --batch 8 --seq 2048 --paths torch,auto   # one GPU
    python experiments/bench_train.py --layers 27 --batch 2 --paths auto                   # the full 15.7B shape
    python experiments/bench_train.py --layers 27 --seq 4096 --batch 1 --grad-accum 32 --paths auto  # the paper's
    python experiments/bench_train.py --layers 27 --seq 4096 --batch 1 --grad-accum 32 --paths auto \
        --experts-per-layer 5.7          # ESFT-Token's average count (7.1: ESFT-Gate); --method lora: LoRA rank 8
    python experiments/bench_train.py --paths auto+reference,auto  # reference vs (on a GPU) fused attention
    python experiments/bench_train.py --tiny                                               # CPU, seconds

Every path runs in its own subprocess, so each peak is that path's alone (JAX: the allocator's
`peak_bytes_in_use`; PyTorch: `torch.cuda.max_memory_allocated`), both counting everything the process holds:
frozen bf16 parameters, trainable fp32 masters and AdamW state, activations. JAX paths run with
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 (unless set) so the 27-layer shape may use the whole GPU; the PyTorch
process never starts a JAX backend.

The step, the same batch on every path: next-token loss on random tokens, backward, AdamW on the first
--experts-per-layer routed experts of every MoE layer, everything else frozen. JAX: `make_train_step` with
`--paths` naming the expert implementation (grouped, auto, ...) and, after a "+", the attention
implementation (auto unless named, which is cuDNN's fused attention on a GPU: `auto+reference` for the
materialised scores), bf16 frozen parameters, fp32 master copies and AdamW state for the trainable expert
rows only. torch: transformers' `DeepseekV2ForCausalLM` from the same config (random init, bf16, default
attention and experts implementations); transformers fuses the experts into [E, ...] tensors, so those
tensors are the only ones with requires_grad, a gradient hook zeroes the rows of the other experts, and AdamW
(weight decay 0, so the frozen rows stay put) holds bf16 state for the whole tensors.
Time: the mean of --iters steps run back to back after the first (which compiles), as the trainer runs them:
the host dispatches a step while the one before runs. A note line gives the median step when each is waited for
before the next is dispatched. "first s" is the first step.

Model FLOPs per token, counted analytically from the config (the same number for every path):
  forward     F = 2 * N_active + L * A
              N_active: parameters a token uses, without the input embedding (attention, dense or shared MLP,
              router, its top-k routed experts, norms, LM head); A = 2 * H * (d_qk + d_v) * (S + 1) / 2, the
              score and value matmuls of causal attention (each query sees (S + 1) / 2 keys on average)
  backward    activation gradients = F again, with the attention matmuls counted twice (both operands need a
              gradient), skipping the layers below the first one with a trainable parameter (no gradient
              reaches them); weight gradients = 2 * (trainable expert weights a token uses), where a token
              reaches a trainable expert K * n / E times per MoE layer on average (uniform routing)
MFU = FLOPs/token * tokens/s over the dense bf16 peak: 989 TFLOP/s (H100 and H200 spec) and 802 TFLOP/s (a dense
8192^3 bf16 matmul measured with jax on the H200, ../shared/baselines.md). Each JAX path also prints XLA's memory
plan of its compiled step (esft_jax/train/memory_plan.py) before the first step runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from esft_jax.config import ModelConfig, config_from_hf, read_hf_config

# device name -> (dense bf16 spec, measured dense matmul with jax; None where not measured)
PEAK_TFLOPS = {"H200": (989.0, 802.0), "H100": (989.0, None)}
RESULT = "RESULT "  # prefix of the worker's one result line on stdout


def hf_config(args) -> dict:
  hf = read_hf_config("tiny-deepseek" if args.tiny else "deepseek-v2-lite")
  return dict(hf, num_hidden_layers=args.layers)


def model_config(args) -> ModelConfig:
  return config_from_hf(hf_config(args))


def selected_experts(config: ModelConfig, per_layer: float) -> dict[int, list[int]]:
  """The first experts of every MoE layer, `per_layer` on average (a fractional average, as the paper's 5.7 for
  ESFT-Token, gives the layers floor or ceil of it, in total the floor of per_layer x layers)."""
  layers = config.moe_layer_ids
  return {layer: list(range(math.floor((i + 1) * per_layer) - math.floor(i * per_layer)))
          for i, layer in enumerate(layers)}


def random_batch(args, vocab_size: int, micro_batches: int = 1) -> dict[str, np.ndarray]:
  """The step's batch [A, B, S] (A micro-batches; [B, S] for one with `micro_batches=0`): random tokens (never the
  low special ids), whole rows, positions 0..S-1."""
  lead = (micro_batches,) if micro_batches else ()
  tokens = np.random.default_rng(0).integers(3, vocab_size, size=(*lead, args.batch, args.seq + 1))
  shape = (*lead, args.batch, args.seq)
  return {"inputs": tokens[..., :-1].astype(np.int32), "targets": tokens[..., 1:].astype(np.int32),
          "loss_mask": np.ones(shape, np.float32), "segment_ids": np.ones(shape, np.int32),
          "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32), shape).copy()}


def flops_per_token(config: ModelConfig, seq: int, trainable_per_layer: float, lora: bool = False
                    ) -> dict[str, float]:
  """The model FLOPs of one training token (see the module docstring), by part. `lora`: every layer trains
  (activation gradients reach layer 0) and the adapters' own weight gradients are left out (rank r: tiny)."""
  import jax

  jax.config.update("jax_platforms", "cpu")  # counting shapes must not claim the GPU the workers need
  from esft_jax.model.transformer import init_params, parameter_counts

  counts = parameter_counts(config)
  moe = config.moe_layer_ids
  attention = 2 * config.num_heads * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim) \
      * (seq + 1) / 2
  forward = 2 * counts.active_per_token + config.num_layers * attention
  # No gradient reaches the layers below the first MoE layer (all frozen): there the backward does nothing.
  shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
  below = [jax.tree_util.tree_leaves(shapes[f"layers_{layer}"]) for layer in range(0 if lora else moe[0])]
  below_flops = sum(2 * sum(leaf.size for leaf in leaves) + 2 * attention for leaves in below)
  activation_grads = forward + config.num_layers * attention - below_flops
  weight_grads = 0 if lora else \
      2 * len(moe) * config.num_experts_per_tok * trainable_per_layer / config.num_experts * counts.per_expert
  return {"forward": forward, "activation_grads": activation_grads, "weight_grads": weight_grads,
          "total": forward + activation_grads + weight_grads}


def run_jax(args, path: str) -> dict:
  import jax
  import jax.numpy as jnp

  from esft_jax.esft.trainable import TrainPlan, count_parameters, init_trainable, plan_from_expert_config
  from esft_jax.model.transformer import Transformer, init_params
  from esft_jax.sharding import single_device_mesh
  from esft_jax.train.memory_plan import device_memory_bytes, format_plan, plan_of_compiled
  from esft_jax.train.optimizer import make_optimizer
  from esft_jax.train.trainer import TrainState, loss_fn, make_train_step, step_shardings
  from timing import median_call_ms, step_ms
  from trace_summary import format_summary, load_trace

  config = model_config(args)
  dtype = jnp.float32 if args.tiny else jnp.bfloat16
  params = init_params(config, jax.random.key(0), param_dtype=dtype)
  plan = TrainPlan("lora", lora_rank=args.lora_rank) if args.method == "lora" else plan_from_expert_config(
      {"experts": {str(l): ids for l, ids in selected_experts(config, args.experts_per_layer).items()}})
  batch = random_batch(args, config.vocab_size, args.grad_accum)
  trained_experts = None if args.all_expert_grads else plan.trained_experts
  impl, _, attention = path.partition("+")
  mesh = single_device_mesh()
  model = Transformer(config, expert_impl=impl, dtype=dtype, remat=args.remat, trained_experts=trained_experts,
                      attention_impl=attention or "auto", max_segments=1, mesh=mesh)  # one document per row
  optimizer = make_optimizer(jax.eval_shape(lambda p: init_trainable(plan, p), params), lambda step: 1e-5)

  def init_state(frozen, stacks) -> TrainState:
    trainable = init_trainable(plan, plan.experts.join(frozen, stacks))
    return TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable), stacks)

  # The step donates the state, which holds the stacks it writes the trained rows into, so from here on the
  # stacks are read from there: `params` would hold deleted arrays.
  frozen, stacks = plan.experts.split(params)
  del params
  shardings = step_shardings(config, plan, mesh, jax.eval_shape(init_state, frozen, stacks))
  step = make_train_step(model, plan, optimizer, lambda s: 1e-5, shardings)
  # Built with the shardings the step returns (as the trainer does), so the second step does not compile again.
  state = jax.jit(init_state, out_shardings=shardings.state, donate_argnums=(1,))(frozen, stacks)
  start = time.perf_counter()
  step = step.lower(state, frozen, batch).compile()  # explicitly, so the profile can read its HLO
  memory = plan_of_compiled(step, state, frozen, mesh, device_memory_bytes())
  print(format_plan(memory), file=sys.stderr, flush=True)
  state, metrics = step(state, frozen, batch)
  first_loss = float(metrics["loss"])
  first_s = time.perf_counter() - start
  (state,), ms, waited_ms = step_ms(step, (state,), frozen, batch, iters=args.iters)
  result = {"ms": ms, "waited_ms": waited_ms, "first_s": first_s, "first_loss": first_loss,
            "peak_bytes": peak_bytes(path), "device": jax.devices()[0].device_kind,
            "software": f"jax {jax.__version__}", "trainable_params": count_parameters(state.trainable),
            "planned_bytes": memory.total, "temporaries_bytes": memory.temporaries}
  if args.breakdown:  # the same loss alone, then with its gradients: where the step's time goes
    # As in the step, the stacks' rows are used as written (here by the last step: for timing, values don't matter)
    loss = lambda trainable, params, micro: loss_fn(model, plan, rows_already_written=True)(
        trainable, params, micro)[0]
    micro = {k: v[0] for k, v in batch.items()}
    params = plan.experts.join(frozen, state.stacks)
    result["forward_ms"] = median_call_ms(jax.jit(loss), state.trainable, params, micro, iters=args.iters)
    result["grad_ms"] = median_call_ms(jax.jit(jax.grad(loss)), state.trainable, params, micro, iters=args.iters)
    del params
  if args.profile:  # two more steps under the profiler: where the device time goes, by model part and kernel
    trace_dir = os.path.join(args.profile, path)
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(2):
        state, metrics = step(state, frozen, batch)
        jax.block_until_ready(metrics["loss"])
    hlo_text = step.as_text()
    Path(trace_dir, "step.hlo.txt").write_text(hlo_text)
    result["profile"] = format_summary(load_trace(trace_dir), 2, path, hlo_text)
  return result


def run_torch(args) -> dict:
  import torch
  import transformers
  from timing import waited_and_back_to_back_ms

  device = "cuda" if torch.cuda.is_available() else "cpu"
  dtype = torch.float32 if args.tiny else torch.bfloat16
  hf = transformers.DeepseekV2Config(**hf_config(args))
  torch.manual_seed(0)
  with torch.device(device):  # 15.7B parameters: initialise them on the GPU, not on the host
    model = transformers.AutoModelForCausalLM.from_config(hf, dtype=dtype)
  model.requires_grad_(False)
  trainable = []
  config = model_config(args)
  for layer, ids in selected_experts(config, args.experts_per_layer).items():
    experts = model.model.layers[layer].mlp.experts
    keep = torch.zeros(config.num_experts, 1, 1, device=device, dtype=dtype)
    keep[ids] = 1
    for weight in (experts.gate_up_proj, experts.down_proj):  # [E, 2F, D] and [E, D, F]
      weight.requires_grad_(True)
      weight.register_hook(lambda grad, keep=keep: grad * keep)
      trainable.append(weight)
  optimizer = torch.optim.AdamW(trainable, lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
  batch = random_batch(args, config.vocab_size, micro_batches=0)
  inputs = torch.from_numpy(batch["inputs"]).to(device, torch.long)
  targets = torch.from_numpy(batch["targets"]).to(device, torch.long)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def step() -> torch.Tensor:
    logits = model(input_ids=inputs, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()

  start = time.perf_counter()
  first_loss = float(step())
  first_s = time.perf_counter() - start
  ms, waited_ms = waited_and_back_to_back_ms(step, lambda _: sync(), args.iters)  # as the JAX paths
  return {"ms": ms, "waited_ms": waited_ms, "first_s": first_s, "first_loss": first_loss,
          "peak_bytes": peak_bytes("torch"),
          "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
          "software": f"torch {torch.__version__}, transformers {transformers.__version__} "
                      f"(attention {model.config._attn_implementation}, "
                      f"experts {model.config._experts_implementation})",
          "trainable_params": sum(len(ids) for ids in selected_experts(config, args.experts_per_layer).values())
                              * 3 * config.hidden_size * config.moe_intermediate_size}


def peak_bytes(path: str) -> int | None:
  """The process's peak device memory so far, or None off GPU."""
  if path == "torch":
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
  import jax

  stats = jax.devices()[0].memory_stats()
  return stats.get("peak_bytes_in_use") if stats else None


def is_out_of_memory(err: BaseException) -> bool:
  text = f"{type(err).__name__} {err}"
  return "OutOfMemoryError" in text or "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def worker(args) -> None:
  """Runs one path and prints its result (or why it failed) as one JSON line."""
  try:
    result = run_torch(args) if args.worker == "torch" else run_jax(args, args.worker)
  except Exception as err:  # the row says why; the other paths still run
    first = (str(err).strip().splitlines() or [""])[0][:300]
    result = {"error": "out of memory" if is_out_of_memory(err) else f"{type(err).__name__}: {first}"}
    try:
      result["peak_bytes"] = peak_bytes(args.worker)
    except Exception:  # the device itself failed: no peak to report
      pass
    print(f"# {args.worker}: {type(err).__name__}: {first}", file=sys.stderr, flush=True)
  print(RESULT + json.dumps(result), flush=True)


def run_path(args, path: str, profile: bool = False) -> dict:
  """One path in its own process: its own allocator, so its own peak. `profile`: a separate process that only
  traces two steps into --profile, with XLA's command buffers off, so that every kernel in the trace carries its
  op's name (inside a command buffer it carries only the buffer's) and the summary can place it in the model."""
  env = dict(os.environ)
  if path == "torch":
    env["JAX_PLATFORMS"] = "cpu"
  else:
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
  switches = {"--tiny": args.tiny, "--remat": args.remat, "--all-expert-grads": args.all_expert_grads,
              "--breakdown": args.breakdown and not profile}
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", path, "--layers", str(args.layers),
         "--batch", str(args.batch), "--grad-accum", str(args.grad_accum), "--seq", str(args.seq), "--experts-per-layer", str(args.experts_per_layer),
         "--method", args.method, "--lora-rank", str(args.lora_rank),
         "--iters", str(1 if profile else args.iters)] + [flag for flag, on in switches.items() if on]
  if profile:
    cmd += ["--profile", os.path.abspath(args.profile)]
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()
  try:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, timeout=args.timeout)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {args.timeout:.0f} s"}
  lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
  if not lines:
    return {"error": f"exit code {proc.returncode}, no result (see the log above)"}
  return json.loads(lines[-1][len(RESULT):])


def cell(value, fmt: str) -> str:
  return "-" if value is None else format(value, fmt)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--layers", type=int, default=8, help="decoder layers (layer 0 dense, the rest MoE)")
  parser.add_argument("--batch", type=int, default=8, help="sequences per micro-batch")
  parser.add_argument("--grad-accum", type=int, default=1,
                      help="micro-batches per step, their gradients averaged (JAX paths; torch runs one)")
  parser.add_argument("--seq", type=int, default=2048)
  parser.add_argument("--experts-per-layer", type=float, default=8,
                      help="trainable experts per MoE layer, on average (ESFT; e.g. 5.7: layers of 5 and 6)")
  parser.add_argument("--method", default="esft", choices=["esft", "lora"],
                      help="JAX paths: ESFT (--experts-per-layer) or LoRA on every linear map (--lora-rank)")
  parser.add_argument("--lora-rank", type=int, default=8)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--paths", default="grouped,auto,torch",
                      help="JAX expert implementations (grouped, auto, gpu, ...), each optionally with an attention "
                           "implementation after a + (default auto: cuDNN flash attention on a GPU; auto+reference: "
                           "materialised scores), and/or torch (runs first)")
  parser.add_argument("--timeout", type=float, default=900, help="seconds per path")
  parser.add_argument("--remat", action="store_true", help="JAX paths recompute each layer in the backward pass")
  parser.add_argument("--all-expert-grads", action="store_true",
                      help="JAX paths compute every routed expert's weight gradient, not only the trained ones' "
                           "(what the kernels did before they skipped frozen experts)")
  parser.add_argument("--breakdown", action="store_true",
                      help="JAX paths also time the loss alone and the loss with its gradients (one line per "
                           "path after the table): forward, backward, and the optimizer with the rest")
  parser.add_argument("--profile", metavar="DIR",
                      help="JAX paths also trace two steps into DIR/PATH and print their device time by model part "
                           "(attention, experts, ...) and top kernels (experiments/trace_summary.py); traced in a "
                           "process of their own with XLA's command buffers off, so kernels keep their ops' names "
                           "(the table's times are with them on)")
  parser.add_argument("--tiny", action="store_true", help="the tiny-deepseek preset on CPU, to keep this working")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.tiny:
    args.layers, args.batch, args.seq, args.iters = 3, 2, 64, 2
  if args.worker:
    worker(args)
    return

  config = model_config(args)
  paths = args.paths.split(",")
  paths.sort(key=lambda p: p != "torch")  # torch first, so every JAX row can print its ratio at once
  if args.method == "lora" and "torch" in paths:
    parser.error("--method lora: the torch path trains ESFT's experts only")
  flops = flops_per_token(config, args.seq, args.experts_per_layer, lora=args.method == "lora")
  if args.grad_accum > 1 and "torch" in paths:
    parser.error("--grad-accum: the torch path runs one micro-batch; compare it at --grad-accum 1")
  tokens = args.grad_accum * args.batch * args.seq
  shape = f"{args.grad_accum} x {args.batch} x {args.seq}" if args.grad_accum > 1 else f"{args.batch} x {args.seq}"
  widths = "tiny-deepseek" if args.tiny else "DeepSeek-V2-Lite widths"
  print(f"# {widths}, {args.layers} layers (layer 0 dense), batch {shape}, "
        + (f"LoRA rank {args.lora_rank} on every linear map" if args.method == "lora" else
           f"{args.experts_per_layer:g} of {config.num_experts} experts trainable per MoE layer"), flush=True)
  print("# model FLOPs per token: forward F = 2*N_active + L*A, A = 2*H*(d_qk + d_v)*(S + 1)/2 (causal); "
        "activation gradients = F again with A twice, none below the first MoE layer; expert weight gradients = "
        "2*(trainable expert weights a token uses: K*n/E experts per MoE layer)")
  print(f"# model GFLOP per token: {flops['total'] / 1e9:.3f} = forward {flops['forward'] / 1e9:.3f} + "
        f"activation gradients {flops['activation_grads'] / 1e9:.3f} + expert weight gradients "
        f"{flops['weight_grads'] / 1e9:.3f}; MFU against 989 TFLOP/s (H100 and H200 dense bf16 spec) and 802 "
        "(measured on an H200)",
        flush=True)
  print("| path | layers | batch x seq | ms/step | tokens/s | peak GiB | first loss | first s | vs torch "
        "| TFLOP/s | MFU (989) | MFU (802) |")
  print("|" + "---|" * 12, flush=True)
  torch_tps = None
  notes, profiles = [], []
  for path in paths:
    r = run_path(args, path)
    peak = r.get("peak_bytes")
    peak_gib = None if peak is None else peak / 2**30
    if "error" in r:
      cells = [r["error"], "-", cell(peak_gib, ".1f"), "-", "-", "-", "-", "-", "-"]
    else:
      tps = tokens / r["ms"] * 1e3
      if path == "torch":
        torch_tps = tps
      tflops = flops["total"] * tps / 1e12
      spec, measured = next((p for name, p in PEAK_TFLOPS.items() if name in r["device"]), (None, None))
      cells = [f"{r['ms']:.1f}", f"{tps:,.0f}", cell(peak_gib, ".1f"), f"{r['first_loss']:.4f}",
               f"{r['first_s']:.1f}", cell(torch_tps and tps / torch_tps, ".2f"), f"{tflops:.1f}",
               cell(spec and tflops / spec, ".1%"), cell(measured and tflops / measured, ".1%")]
      notes.append(f"# {path}: {r['device']}, {r['software']}, {r['trainable_params']:,} trainable parameters; "
                   f"{r['waited_ms']:.1f} ms a step when each is waited for before the next is dispatched"
                   + (f"; XLA's plan of the step: {r['planned_bytes'] / 2**30:.1f} GiB, of which temporaries "
                      f"{r['temporaries_bytes'] / 2**30:.1f} GiB" if "planned_bytes" in r else ""))
      if args.profile and path != "torch":
        traced = run_path(args, path, profile=True)
        profiles.append(traced.get("profile") or f"# {path} profile: {traced.get('error')}")
      if "grad_ms" in r:
        notes.append(f"# {path} breakdown: forward {r['forward_ms']:.1f} ms, backward "
                     f"{r['grad_ms'] - r['forward_ms']:.1f} ms, optimizer and the rest {r['ms'] - r['grad_ms']:.1f} "
                     f"ms of the {r['ms']:.1f} ms step")
    print("| " + " | ".join([path, str(args.layers), shape, *cells]) + " |", flush=True)
  for note in notes:
    print(note)
  for r in profiles:
    print(r)


if __name__ == "__main__":
  main()
