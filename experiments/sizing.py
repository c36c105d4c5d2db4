"""Per-device memory of ESFT and FFT training steps on candidate meshes, from abstract arrays (nothing allocated),
and the step time those devices would take at the measured expert-kernel speed: DeepSeek-V3's sizing plan.

    python experiments/sizing.py --remat --candidates "2x8 H200" "4x8 H100" v5p-128 v6e-256   # minutes
    python experiments/sizing.py --remat --methods fft --no-temporaries       # the state of every candidate
    python experiments/sizing.py --tiny               # tiny-deepseek on 8 simulated CPU devices, seconds

Columns, per device (GiB):
- weights, trainable, optimizer, gradients: exact, each leaf's shard as its sharding on the mesh makes it
  (`esft_jax.sharding`): frozen weights in bf16 (the router fp32), trainable fp32 master copies, AdamW's two fp32
  moments, the trainable tree's fp32 gradients.
- temporaries (estimate): what XLA plans for the compiled step beyond its arguments (activations kept for the
  backward, gathered weights, the gradients), compiled on simulated CPU devices at the real widths with one and
  two MoE layers (the dense layers as in the model), and extrapolated linearly in the MoE layers. The expert
  matmuls are the TPU path ("tpu") with its megablox kernels replaced by opaque stand-ins of the same outputs
  (`OpaqueKernels`): XLA:CPU's own grouped matmul (`lax.ragged_dot`) materialises every expert's product, 238 GiB
  of temporaries for one [32768 x 7168] x [256 x 7168 x 2048] matmul, and Pallas' interpreter copies the weights.
  XLA:CPU sizes some buffers unlike a TPU or GPU compiler (it keeps fp32 copies of bf16 arrays, for one); hence
  an estimate. Not compiled (nan) where the state alone exceeds a device's memory.
- fits: state: weights, trainable, optimizer state and gradients (exact) within the device's memory, a necessary
  condition; fits: est.: with the estimated temporaries instead of the gradients (n/c: not compiled).
- step s, tokens/s (estimates): the step's matmul FLOPs (6 x active parameters per token for FFT; for ESFT the
  weight gradients only of the routed experts, for the share of assignments routed to trained ones,
  `--trained-share`; attention's score and value products included) at `--expert-tflops` (the expert matmuls'
  rate measured on an H200, BENCHMARKS.md) scaled by the device's bf16 peak against the H200's 989, every device
  busy, no communication counted.

ESFT trains `--experts-per-layer` random routed experts of every MoE layer (seeded; the paper's selections train
5-15% of a layer's experts), written to `--expert-config` for `esft-jax train` to read.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

if "--temporaries-of" in sys.argv:  # the child process: as many simulated devices as its mesh has
  devices = json.loads(sys.argv[sys.argv.index("--temporaries-of") + 1])["devices"]
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}")
  os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AbstractMesh, AxisType  # noqa: E402

from esft_jax import sharding  # noqa: E402
from esft_jax.config import ModelConfig, load_config  # noqa: E402
from esft_jax.esft.trainable import TrainPlan, init_trainable, plan_from_expert_config  # noqa: E402
from esft_jax.model.transformer import Transformer, init_params, parameter_counts  # noqa: E402
from esft_jax.train.optimizer import learning_rate_schedule, make_optimizer  # noqa: E402
from esft_jax.train.trainer import _init_state, make_train_step, step_shardings  # noqa: E402

# Tracing DeepSeek-V3's 61 layers takes seconds each time: each config's and mesh's shapes and shardings once.
sharding.param_shardings = functools.lru_cache(sharding.param_shardings)
sharding.logical_axes = functools.lru_cache(sharding.logical_axes)
GIB = 2**30
H200_PEAK = 989.0  # bf16 dense TFLOP/s, the peak the measured expert-kernel rate is a fraction of


@dataclasses.dataclass(frozen=True)
class Candidate:
  name: str
  mesh: dict[str, int]
  memory_gib: float  # HBM per device
  peak_tflops: float  # bf16 dense peak per device


# HBM per device (the GPUs' as nvidia-smi reports it: 81,559 and 143,771 MiB) and bf16 dense peaks as their makers
# publish them. Meshes: ESFT's trainable slices split over fsdp x tensor only (never over their few experts), so
# no expert axis; tensor=8 splits each layer's gathered experts 8 ways (the routed experts are where the bytes are).
H200, H100, V5P, V6E = (143771 / 1024, 989.0), (81559 / 1024, 989.0), (95.0, 459.0), (32.0, 918.0)
CANDIDATES = (
    Candidate("2x8 H200", {"fsdp": 2, "tensor": 8}, *H200),
    Candidate("4x8 H100", {"fsdp": 4, "tensor": 8}, *H100),
    Candidate("v5p-128", {"fsdp": 8, "tensor": 8}, *V5P),
    Candidate("v6e-256", {"fsdp": 32, "tensor": 8}, *V6E),
    # larger, for what FFT needs
    Candidate("16x8 H200", {"fsdp": 16, "tensor": 8}, *H200),
    Candidate("32x8 H100", {"fsdp": 32, "tensor": 8}, *H100),
    Candidate("v5p-256", {"fsdp": 16, "tensor": 8}, *V5P),
    Candidate("v5p-512", {"fsdp": 32, "tensor": 8}, *V5P),
    Candidate("v6e-512", {"fsdp": 64, "tensor": 8}, *V6E),
)
TINY_CANDIDATES = (Candidate("tiny x8", {"fsdp": 4, "expert": 2}, 1.0, 989.0),)


def abstract_mesh(axes: dict[str, int]) -> AbstractMesh:
  sizes = {name: int(axes.get(name, 1)) for name in sharding.MESH_AXES}
  return AbstractMesh(tuple(sizes.values()), tuple(sizes), axis_types=(AxisType.Auto,) * len(sizes))


def shard_bytes(tree) -> int:
  return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
             for leaf in jax.tree_util.tree_leaves(tree))


def _placed(tree, shardings):
  return jax.tree_util.tree_map(lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where),
                                tree, shardings)


def esft_config(cfg: ModelConfig, experts_per_layer: int, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  return {"experts": {str(layer): sorted(int(e) for e in rng.choice(cfg.num_experts, experts_per_layer, False))
                      for layer in cfg.moe_layer_ids}, "shared_experts": False, "non_expert_modules": False}


@functools.lru_cache
def param_shapes(cfg: ModelConfig):
  return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), param_dtype=jnp.bfloat16))


def step_parts(cfg: ModelConfig, plan: TrainPlan, mesh, tokens_per_device: tuple[int, int], expert_impl: str,
               remat: bool = False):
  """The jitted train step and its abstract arguments on `mesh` (bf16 weights, fp32 trainable and AdamW)."""
  params = _placed(param_shapes(cfg), sharding.param_shardings(cfg, mesh))
  schedule = learning_rate_schedule(1e-5, 100)
  optimizer = make_optimizer(jax.eval_shape(lambda p: init_trainable(plan, p, jax.random.key(0)), params), schedule)
  init = _init_state(plan, optimizer, 0)
  frozen, stacks = plan.experts.split(params)
  state_like = jax.eval_shape(init, frozen, stacks)
  shardings = step_shardings(cfg, plan, mesh, state_like)
  state = _placed(state_like, shardings.state)
  rows, length = tokens_per_device
  shape = (1, rows * sharding.batch_parallelism(mesh), length)
  batch = {key: jax.ShapeDtypeStruct(shape, jnp.float32 if key == "loss_mask" else jnp.int32,
                                     sharding=shardings.batch)
           for key in ("inputs", "targets", "loss_mask", "segment_ids", "positions")}
  model = Transformer(cfg, expert_impl=expert_impl, dtype=jnp.bfloat16, max_segments=1, remat=remat,
                      trained_experts=plan.trained_experts, mesh=mesh)
  return make_train_step(model, plan, optimizer, schedule, shardings), (state, frozen, batch)


def state_bytes(cfg: ModelConfig, plan: TrainPlan, axes: dict[str, int]) -> dict[str, int]:
  _, (state, frozen, _) = step_parts(cfg, plan, abstract_mesh(axes), (1, 8), "grouped")
  gradients = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=x.sharding),
                                     state.trainable)
  return {"weights": shard_bytes(frozen) + shard_bytes(state.stacks), "trainable": shard_bytes(state.trainable),
          "optimizer": shard_bytes(state.opt_state), "gradients": shard_bytes(gradients)}


def _with_moe_layers(cfg: ModelConfig, moe: int) -> ModelConfig:
  dense = cfg.moe_layers.index(True)
  return dataclasses.replace(cfg, num_layers=dense + moe, moe_layers=(False,) * dense + (True,) * moe)


class OpaqueKernels:
  """Stand-ins for megablox's `gmm` and `tgmm`: their signatures and output shapes, opaque to XLA (host callbacks,
  compiled, never run), so a CPU compiles the TPU path allocating what the kernels allocate, their outputs, and
  copying no input (Pallas' interpreter copies the weights into its loop state)."""

  @staticmethod
  def _opaque(shape, dtype, *operands):
    out = jax.ShapeDtypeStruct(shape, dtype)
    return jax.pure_callback(lambda *_: np.zeros(shape, dtype), out, *operands)

  @staticmethod
  def gmm(lhs, rhs, group_sizes, preferred_element_type, tiling, group_offset=None, existing_out=None,
          transpose_rhs=False, interpret=False):
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    return OpaqueKernels._opaque((lhs.shape[0], n), preferred_element_type, lhs, rhs, group_sizes)

  @staticmethod
  def tgmm(lhs, rhs, group_sizes, preferred_element_type, tiling, group_offset=None, num_actual_groups=None,
           existing_out=None, interpret=False):
    groups = num_actual_groups or group_sizes.shape[0]
    return OpaqueKernels._opaque((groups, lhs.shape[0], rhs.shape[1]), preferred_element_type,
                                 lhs.swapaxes(0, 1), rhs, group_sizes)  # as tgmm hands its lhs to the kernel


def temporaries_gib(request: dict) -> float:
  """In the child process: XLA's temporaries of the step at one and two MoE layers, extrapolated."""
  from esft_jax.model.kernels import megablox

  megablox._kernels = OpaqueKernels
  cfg = load_config(request["model"])
  mesh = sharding.make_mesh(request["mesh"])
  found = []
  for moe in (1, 2):
    shallow = _with_moe_layers(cfg, moe)
    plan = TrainPlan("fft") if request["method"] == "fft" else plan_from_expert_config(
        {"experts": {str(layer): ids for layer, ids in request["experts"].items() if int(layer) in
                     shallow.moe_layer_ids}, "shared_experts": False})
    step, args = step_parts(shallow, plan, mesh, tuple(request["tokens"]), "tpu", request["remat"])
    found.append(step.lower(*args).compile().memory_analysis().temp_size_in_bytes)
  per_layer = found[1] - found[0]
  return (found[0] + per_layer * (len(cfg.moe_layer_ids) - 1)) / GIB


def step_tflop(cfg: ModelConfig, method: str, tokens: int, seq: int, trained_share: float) -> float:
  """Matmul TFLOP of one step over `tokens` tokens in sequences of `seq` (2 per multiply-add): the forward, the
  input gradients (as many again; attention's score and value products twice, for dP and dV, dQ and dK), and the
  weight gradients of what trains."""
  counts = parameter_counts(cfg)
  routed = cfg.num_experts_per_tok * 3 * cfg.hidden_size * cfg.moe_intermediate_size * len(cfg.moe_layer_ids)
  dense = counts.active_per_token - routed  # every other weight a token touches
  heads, qk, v = cfg.num_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
  attention = 2 * heads * (qk + v) * seq / 2 * cfg.num_layers  # scores and values, causal: half the pairs
  linear = 2 * (dense + routed)
  if method == "fft":
    weight_grads = linear
  else:  # only the trained experts, on the assignments routed to them
    weight_grads = 2 * routed * trained_share
  return (2 * linear + 3 * attention + weight_grads) * tokens / 1e12


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="deepseek-v3")
  parser.add_argument("--candidates", nargs="*", help="names from the table (default: all)")
  parser.add_argument("--methods", nargs="*", default=["esft", "fft"], choices=["esft", "fft"])
  parser.add_argument("--mesh", help="another mesh for the candidates named, e.g. fsdp=8,expert=32")
  parser.add_argument("--experts-per-layer", type=int, default=26)
  parser.add_argument("--expert-config", type=Path, default=Path("configs/sizing/deepseek-v3-esft-26.json"))
  parser.add_argument("--seq", type=int, default=4096)
  parser.add_argument("--rows", type=int, default=1, help="sequences per batch shard (data x fsdp x expert)")
  parser.add_argument("--trained-share", type=float, default=0.2,
                      help="share of the routed assignments that land on trained experts (ESFT's token p=0.2)")
  parser.add_argument("--expert-tflops", type=float, default=600.0, help="measured on one H200 (BENCHMARKS.md)")
  parser.add_argument("--no-temporaries", action="store_true",
                      help="weights and state only (no compiling); a step whose state alone exceeds a device's memory "
                           "is never compiled")
  parser.add_argument("--remat", action="store_true", help="recompute each decoder layer in the backward pass "
                      "(`esft-jax train --remat`): a layer's input is kept, not its activations")
  parser.add_argument("--tiny", action="store_true")
  parser.add_argument("--temporaries-of", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.temporaries_of:
    print(json.dumps({"temporaries_gib": temporaries_gib(json.loads(args.temporaries_of))}))
    return
  if args.tiny:
    args.model, args.experts_per_layer, args.seq = "tiny-deepseek", 2, 64
    args.expert_config = Path(os.environ.get("TMPDIR", "/tmp")) / "tiny-deepseek-esft.json"
  cfg = load_config(args.model)
  experts = esft_config(cfg, args.experts_per_layer, seed=0)
  args.expert_config.parent.mkdir(parents=True, exist_ok=True)
  args.expert_config.write_text(json.dumps(experts, indent=1) + "\n")
  known = TINY_CANDIDATES if args.tiny else CANDIDATES
  unknown = set(args.candidates or ()) - {c.name for c in known}
  if unknown:
    raise SystemExit(f"--candidates {sorted(unknown)}: unknown; the candidates are {[c.name for c in known]}")
  candidates = [c for c in known if not args.candidates or c.name in args.candidates]
  if args.mesh:
    axes = {name: size for name, size in sharding.parse_mesh(args.mesh).items() if size != 1}
    candidates = [dataclasses.replace(c, mesh=axes) for c in candidates]
  print(f"{args.model}: {parameter_counts(cfg).total / 1e9:.0f}B parameters; ESFT trains {args.experts_per_layer} "
        f"of {cfg.num_experts} routed experts in each of {len(cfg.moe_layer_ids)} MoE layers "
        f"({args.expert_config}); {args.rows} x {args.seq} tokens per batch shard"
        f"{'; layers recomputed in the backward (--remat)' if args.remat else ''}\n")
  unit, unit_name = (2**20, "MiB") if args.tiny else (GIB, "GiB")
  print(f"per device, in {unit_name}\n")
  print("| candidate | devices | mesh | method | weights | trainable | optimizer | gradients | temporaries (est.) "
        "| total (est.) | HBM | fits: state | fits: est. | tokens/step | step s (est.) | tokens/s (est.) |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for candidate in candidates:
    devices = math.prod(candidate.mesh.values())
    memory = candidate.memory_gib * GIB
    for method in args.methods:
      plan = TrainPlan("fft") if method == "fft" else plan_from_expert_config(experts)
      parts = state_bytes(cfg, plan, candidate.mesh)
      temporaries = float("nan")
      # the gradients are among the step's temporaries: with the rest of the state, the least a step holds
      if not args.no_temporaries and sum(parts.values()) <= memory:  # else it cannot fit whatever XLA plans
        request = {"model": args.model, "mesh": candidate.mesh, "devices": devices, "method": method,
                   "experts": experts["experts"], "tokens": [args.rows, args.seq], "remat": args.remat}
        done = subprocess.run([sys.executable, __file__, "--temporaries-of", json.dumps(request)],
                              capture_output=True, text=True)
        if done.returncode:
          raise SystemExit(f"compiling {candidate.name} {method} failed:\n{done.stderr[-3000:]}")
        temporaries = json.loads(done.stdout.strip().splitlines()[-1])["temporaries_gib"] * GIB
      total = parts["weights"] + parts["trainable"] + parts["optimizer"] + (
          parts["gradients"] if math.isnan(temporaries) else temporaries)
      tokens = sharding.batch_parallelism(abstract_mesh(candidate.mesh)) * args.rows * args.seq
      rate = args.expert_tflops * candidate.peak_tflops / H200_PEAK
      seconds = step_tflop(cfg, method, tokens, args.seq, args.trained_share) / (rate * devices)
      mesh = ",".join(f"{k}={v}" for k, v in candidate.mesh.items())
      sizes = " | ".join(f"{value / unit:.1f}" for value in (*parts.values(), temporaries, total, memory))
      state_fits = "yes" if sum(parts.values()) <= memory else "no"
      fits = "n/c" if math.isnan(temporaries) and state_fits == "yes" else ("yes" if total <= memory else "no")
      print(f"| {candidate.name} | {devices} | {mesh} | {method} | {sizes} | {state_fits} | {fits} | {tokens} "
            f"| {seconds:.2f} | {tokens / seconds:,.0f} |", flush=True)

if __name__ == "__main__":
  main()
