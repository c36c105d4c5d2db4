"""What a training step holds on each device, from the compiled step alone: `esft-jax train --plan`, and the check
that stops a run which will not fit before its first step.

The step is compiled on the run's mesh from abstract arrays (shapes, dtypes and shardings, no values), so a plan
needs neither the weights nor the devices' memory: a mesh larger than the machine is planned on simulated devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=N` on a CPU, set before JAX starts). The per-device bytes of
the weights, the optimizer state and the batch are read off their shardings; the temporaries (activations, the
gradients and whatever else the step makes and frees) are XLA's own plan of the compiled program
(`memory_analysis`). Temporaries depend on the backend that compiles: a plan is exact for the device kind it was
compiled on. A plan compiled on a CPU has exact weights, optimizer state and gradients, but XLA:CPU's temporaries,
which overstate an accelerator's for a large MoE: it computes `lax.ragged_dot` (the grouped expert matmuls)
densely, with [experts, tokens, width] intermediates, and some bf16 operations in fp32 copies.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from esft_jax import sharding
from esft_jax.config import ModelConfig, load_config
from esft_jax.esft.trainable import TrainPlan
from esft_jax.model.transformer import init_params

GIB = 2**30
BATCH_KEYS = {"inputs": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.float32, "segment_ids": jnp.int32,
              "positions": jnp.int32}


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Bytes one device holds during a training step (the largest shard where devices differ)."""
  device_kind: str  # the device the step was compiled for (its backend sized the temporaries)
  mesh: str
  frozen: int  # frozen weights, the stacks that take trained rows included
  trainable: int  # trainable weights (fp32 master copies)
  optimizer: int  # optimizer state
  gradients: int  # the trainable tree's gradients, in fp32: part of the temporaries
  other: int  # the batch, the step counter and the outputs not written over their inputs
  temporaries: int  # XLA's temporaries of the compiled step
  device_memory: int | None  # what a device offers (None: unknown, e.g. a CPU without --device-memory-gib)

  @property
  def total(self) -> int:
    return self.frozen + self.trainable + self.optimizer + self.other + self.temporaries

  @property
  def fits(self) -> bool | None:
    return None if self.device_memory is None else self.total <= self.device_memory


class DoesNotFit(ValueError):
  """A training step needs more memory than a device has; the message holds the plan and what would fit."""


def shard_bytes(tree) -> int:
  """Bytes one device holds of a tree of arrays or ShapeDtypeStructs with shardings (a whole leaf without one)."""
  total = 0
  for leaf in jax.tree_util.tree_leaves(tree):
    held = getattr(leaf, "sharding", None)
    shape = held.shard_shape(leaf.shape) if held is not None else leaf.shape
    total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
  return total


def device_memory_bytes(device_memory_gib: float | None = None) -> int | None:
  """`device_memory_gib` when given, else what this process's first device's allocator may use (None where it
  does not say, as on CPUs)."""
  if device_memory_gib is not None:
    return int(device_memory_gib * GIB)
  stats = jax.local_devices()[0].memory_stats()  # another process's devices do not report theirs
  return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def plan_of_compiled(compiled: jax.stages.Compiled, state, frozen, mesh: Mesh,
                     device_memory: int | None) -> MemoryPlan:
  """The plan of a compiled train step (`make_train_step(...).lower(state, frozen, batch).compile()`), with
  `state` and `frozen` the arrays (or abstract arrays) it was lowered with. The state's stacks count as frozen
  weights: only their trained rows change."""
  stats = compiled.memory_analysis()
  frozen_bytes = shard_bytes(frozen) + shard_bytes(state.stacks)
  trainable, optimizer = shard_bytes(state.trainable), shard_bytes(state.opt_state)
  held = stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
  gradients = shard_bytes(jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=getattr(x, "sharding", None)), state.trainable))
  return MemoryPlan(device_kind=mesh.devices.flat[0].device_kind, mesh=sharding.describe_sizes(mesh.shape),
                    frozen=frozen_bytes, trainable=trainable, optimizer=optimizer, gradients=gradients,
                    other=max(int(held) - frozen_bytes - trainable - optimizer, 0),
                    temporaries=int(stats.temp_size_in_bytes), device_memory=device_memory)


def abstract_params(config: ModelConfig, mesh: Mesh, param_dtype: Any) -> dict:
  """The model's parameters as abstract arrays on `mesh`, as `load_hf_model(dir, param_dtype, param_shardings)`
  returns them: `param_dtype` everywhere but the fp32 router."""
  shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0), param_dtype=jnp.dtype(param_dtype)))
  return jax.tree_util.tree_map(lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where),
                                shapes, sharding.param_shardings(config, mesh))


def abstract_batch(micro_batches: int, batch_size: int, seq_length: int, where) -> dict:
  """The train step's batch [micro-batches, batch, length] as abstract arrays."""
  shape = (micro_batches, batch_size, seq_length)
  return {key: jax.ShapeDtypeStruct(shape, dtype, sharding=where) for key, dtype in BATCH_KEYS.items()}


def plan_train_step(config: ModelConfig, plan: TrainPlan, cfg, mesh: Mesh, batch_size: int, seq_length: int,
                    param_dtype: Any = "bfloat16") -> MemoryPlan:
  """Compiles the train step of `cfg` (a `TrainConfig`) for a global micro-batch of `batch_size` x `seq_length`
  on `mesh`, from abstract arrays only, and returns its memory plan against `cfg.device_memory_gib` (default: the
  device's own)."""
  from esft_jax.train.trainer import _init_state, make_train_step, step_shardings, train_model, train_optimizer

  params = abstract_params(config, mesh, param_dtype)
  optimizer, schedule = train_optimizer(plan, cfg, params)
  init = _init_state(plan, optimizer, cfg.seed)
  frozen, stacks = plan.experts.split(params)
  state_like = jax.eval_shape(init, frozen, stacks)
  shardings = step_shardings(config, plan, mesh, state_like)
  state = jax.tree_util.tree_map(lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where),
                                 state_like, shardings.state)
  batch = abstract_batch(cfg.grad_accum, batch_size, seq_length, shardings.batch)
  step = make_train_step(train_model(config, plan, cfg, mesh), plan, optimizer, schedule, shardings)
  compiled = step.lower(state, frozen, batch).compile()
  return plan_of_compiled(compiled, state, frozen, mesh, device_memory_bytes(cfg.device_memory_gib))


def plan_run(model: str | Path, method: str, expert_config_path: str | Path | None, cfg, batch_size: int,
             seq_length: int, lora_rank: int = 8, param_dtype: Any = "bfloat16",
             mesh: Mesh | None = None) -> MemoryPlan:
  """`esft-jax train --plan`: the plan of the run `finetune` would start, from the model's config.json (or a
  preset name) and the expert config alone: no weights are read and no data. The fused attention is built for one
  segment per row (packed rows with more take slightly more temporaries)."""
  from esft_jax.train.run import make_plan

  mesh = mesh or sharding.single_device_mesh()
  sharding.check_batch_size(batch_size, mesh)
  config = load_config(model)
  plan, _ = make_plan(method, config, expert_config_path, lora_rank)
  return plan_train_step(config, plan, cfg, mesh, batch_size, seq_length, param_dtype)


def _size(nbytes: float) -> str:
  return f"{nbytes / GIB:.1f} GiB" if nbytes >= GIB else f"{nbytes / 2**20:.1f} MiB"


def format_plan(memory: MemoryPlan) -> str:
  """The plan as a table per device, in GiB (MiB for plans under 1 GiB)."""
  unit, scale = ("GiB", GIB) if memory.total >= GIB else ("MiB", 2**20)
  rows = [("frozen weights", memory.frozen), ("trainable weights (fp32)", memory.trainable),
          ("optimizer state", memory.optimizer), ("batch and other outputs", memory.other),
          ("temporaries (XLA)", memory.temporaries),
          ("  of which gradients (fp32), at least", memory.gradients), ("total", memory.total)]
  lines = [f"memory plan of one training step, per device (compiled for {memory.device_kind}, mesh {memory.mesh})",
           f"| what | {unit} |", "|---|---|"]
  lines += [f"| {name} | {value / scale:.2f} |" for name, value in rows]
  if memory.device_kind == "cpu":
    lines.append("temporaries as XLA:CPU sizes them: for a large MoE far above a GPU's or TPU's (it runs the grouped "
                 "expert matmuls densely); compile on the target device for its own")
  if memory.device_memory is None:
    lines.append("device memory: unknown (pass --device-memory-gib to check the fit)")
  else:
    over = (memory.total - memory.device_memory) / scale
    verdict = "fits" if memory.fits else f"does NOT fit: {over:.2f} {unit} over"
    lines.append(f"device memory: {memory.device_memory / scale:.2f} {unit}; {verdict}")
  return "\n".join(lines)


def advice(memory: MemoryPlan, remat: bool, batch_size: int, grad_accum: int, devices: int) -> list[str]:
  """The options that shrink what does not fit, most direct first. Temporaries grow with the micro-batch;
  weights and optimizer state shrink only by splitting them over more devices."""
  options = []
  weights = memory.frozen + memory.trainable + memory.optimizer
  if memory.device_memory is not None and weights < memory.device_memory:
    if not remat:
      options.append("--remat: recompute each decoder layer in the backward pass, so activations of one layer "
                     "are held instead of all of them (about a third more compute)")
    if batch_size > 1:
      options.append(f"--batch-size {batch_size // 2} --grad-accum {grad_accum * 2}: half the micro-batch, the "
                     "same global batch (temporaries shrink about in proportion)")
  if memory.device_memory:  # weights at most half a device, the rest left for temporaries
    whole = weights * devices  # as if every weight were split (replicated ones are not: an estimate)
    need = max(2 * devices, math.ceil(whole / (0.5 * memory.device_memory)))
    options.append(f"--mesh fsdp={need} (or more devices): weights and optimizer state split over the devices, "
                   f"about {_size(whole / need)} each instead of {_size(weights)}")
  options.append("fewer trainable parameters (ESFT: a lower --top-p in `esft-jax select`; LoRA: a lower rank)")
  return options


def check_fits(memory: MemoryPlan, remat: bool, batch_size: int, grad_accum: int, devices: int) -> None:
  """Raises DoesNotFit, with the plan and the options, when the step needs more than a device has."""
  if memory.fits is False:
    options = "\n".join(f"  - {option}" for option in advice(memory, remat, batch_size, grad_accum, devices))
    raise DoesNotFit(f"the training step does not fit in device memory; nothing was run.\n{format_plan(memory)}\n"
                     f"options that use less memory per device:\n{options}")
