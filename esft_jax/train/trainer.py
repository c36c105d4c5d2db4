"""The one training loop. FFT, LoRA and ESFT differ only in their `TrainPlan` (what is trainable).

A step, `(state, frozen, batch) -> (state, metrics)`: write ESFT's trained rows into their stacks (held in the
donated `TrainState`, so in place; `TrainedExperts`), run the model with the rows also as inputs of their own
(they alone get gradients), take the masked next-token loss plus the model's balance loss (added to the gradient,
not to the reported loss, as DeepSeek does), average gradients over `grad_accum` micro-batches (with `lax.scan`
when there are several), and apply the multi-transform optimizer. Only the trainable tree has gradients and
optimizer state.

Every run has a device mesh (one device without --mesh): the steps are jitted with NamedSharding in and out
shardings from esft_jax.sharding (frozen parameters, state, batch), each process
feeds its own rows of the global batch, and only process 0 writes logs and adapters. Orbax writes the
checkpoint shards of every process and restores them onto whatever mesh the resuming run has.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from esft_jax import sharding
from esft_jax.config import ModelConfig
from esft_jax.esft.trainable import TrainPlan, count_parameters, init_trainable, merge_trainable, tree_bytes
from esft_jax.model.attention import check_segments, resolve_attention_impl
from esft_jax.model.transformer import Transformer
from esft_jax.train.config import TrainConfig
from esft_jax.train import memory_plan
from esft_jax.train.loss import masked_mean_loss
from esft_jax.train.metrics import MetricsWriter, progress
from esft_jax.train.optimizer import learning_rate_schedule, make_optimizer

Batch = dict[str, np.ndarray]  # inputs, targets, loss_mask, segment_ids, positions: [B, L]


class TrainState(NamedTuple):
  """What a step changes; the steps take it donated and return it. `stacks`: the routed-expert stacks that get
  trained rows (`TrainedExperts.split`; empty for FFT and LoRA), which every step writes the current rows into in
  place: held twice, frozen and written, they would take twice their memory, and a copy of them would be read and
  written in full every step. Checkpoints hold the other fields (`CHECKPOINTED`): the stacks are the frozen
  model's, with rows the trainable tree holds."""
  step: jax.Array
  trainable: Any
  opt_state: Any
  stacks: Any


CHECKPOINTED = ("step", "trainable", "opt_state")


class StepShardings(NamedTuple):
  """Where every input and output of the jitted steps lives."""
  mesh: Mesh
  frozen: Any  # the parameters but the stacks in `state.stacks`
  state: TrainState
  batch: NamedSharding  # [A, B, L] micro-batches, split on B
  eval_batch: NamedSharding  # [B, L]


def step_shardings(config: ModelConfig, plan: TrainPlan, mesh: Mesh, state_like: TrainState) -> StepShardings:
  """All shardings of a run, checked against the model's shapes before anything compiles."""
  frozen, stacks = plan.experts.split(sharding.param_shardings(config, mesh))
  trainable = sharding.trainable_shardings(plan, config, mesh, state_like.trainable)
  opt_state = sharding.opt_state_shardings(state_like.opt_state, state_like.trainable, trainable, mesh)
  state = TrainState(sharding.replicated(mesh), trainable, opt_state, stacks)
  return StepShardings(mesh, frozen, state, sharding.batch_sharding(mesh, 1), sharding.batch_sharding(mesh))


def loss_fn(model: Transformer, plan: TrainPlan, rows_already_written: bool = False):
  """(trainable, params, batch) -> (loss with the balance loss, metrics). `rows_already_written`: the stacks of
  `params` hold the trained rows (`TrainedExperts.write_rows`); the model takes the rows apart from them, as
  values that alone get gradients (`TrainedExperts.rows_by_layer`), and must name the plan's trained experts."""
  if rows_already_written and plan.experts.layers and model.trained_experts != plan.trained_experts:
    raise ValueError(f"the model's trained_experts are {model.trained_experts}, the plan's {plan.trained_experts}: "
                     "build the model with Transformer(trained_experts=plan.trained_experts) (as `train_model` does), "
                     "so that the rows it is given are those of the experts it trains")

  def loss(trainable, params, batch):
    trained_rows = plan.experts.rows_by_layer(params, trainable) if rows_already_written else None
    params = merge_trainable(plan, params, trainable, rows_already_written)
    out = model.apply({"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"],
                      trained_rows=trained_rows)
    lm_loss = masked_mean_loss(out.logits, batch["targets"], batch["loss_mask"])
    valid = (batch["segment_ids"] != 0).astype(jnp.float32)
    loads = [_load_imbalance(r.expert_ids, valid, model.config.num_experts) for r in out.routing]
    load = jnp.mean(jnp.stack(loads)) if loads else jnp.zeros(())
    return lm_loss + out.aux_loss, {"loss": lm_loss, "aux_loss": out.aux_loss, "expert_load_max": load}
  return loss


def _load_imbalance(ids_BxLxK, valid_BxL, num_experts):
  """max_i(share of assignments to expert i) * E: 1.0 is perfectly balanced."""
  counts = jnp.zeros(num_experts).at[ids_BxLxK].add(valid_BxL[..., None])
  return jnp.max(counts) / jnp.maximum(counts.sum(), 1.0) * num_experts


def _with_current_rows(plan: TrainPlan, state: TrainState, frozen) -> tuple[TrainState, dict]:
  """`state` with the trained rows written into its stacks (in place: the steps donate it), and the whole parameter
  tree around them, for a loss with `rows_already_written`."""
  stacks = plan.experts.write_rows(state.stacks, state.trainable)
  return state._replace(stacks=stacks), plan.experts.join(frozen, stacks)


def make_train_step(model: Transformer, plan: TrainPlan, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, shardings: StepShardings, max_traces: int | None = None) -> Callable:
  """(state, frozen, batch [A, B, L]) -> (state, metrics); A micro-batches are averaged equally.

  `frozen, stacks = plan.experts.split(params)`, the stacks in `state.stacks`: the state is donated and returned,
  so the trained rows are written into the stacks in place. Pass the returned state to the next step; the arrays
  passed in are gone after the call. Every frozen value stays as it was.

  `max_traces`: fail (`chex.assert_max_traces`) when the step is traced more often, as it would be if the state
  or stacks it returns did not match those it takes (shape, dtype, sharding) and every step recompiled; tests
  set it after `chex.clear_trace_counter()`, since the count is kept per definition site, process-wide."""
  grad_fn = jax.grad(loss_fn(model, plan, rows_already_written=True), has_aux=True)

  def step(state: TrainState, frozen, batch):
    state, params = _with_current_rows(plan, state, frozen)
    n = batch["inputs"].shape[0]
    with sharding.logical_rules(shardings.mesh):
      if n == 1:  # no accumulator: saves a full-size fp32 buffer and its add
        grads, metrics = grad_fn(state.trainable, params, jax.tree_util.tree_map(lambda x: x[0], batch))
      else:
        def micro(acc, micro_batch):
          return jax.tree_util.tree_map(jnp.add, acc, grad_fn(state.trainable, params, micro_batch)), None

        zeros = (jax.tree_util.tree_map(jnp.zeros_like, state.trainable),
                 {"loss": 0.0, "aux_loss": 0.0, "expert_load_max": 0.0})
        (grads, metrics), _ = jax.lax.scan(micro, jax.tree_util.tree_map(jnp.asarray, zeros), batch)
        grads, metrics = jax.tree_util.tree_map(lambda x: x / n, (grads, metrics))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
    return TrainState(state.step + 1, trainable, opt_state, state.stacks), metrics

  if max_traces is not None:
    step = chex.assert_max_traces(step, n=max_traces)
  return jax.jit(step, in_shardings=(shardings.state, shardings.frozen, shardings.batch),
                 out_shardings=(shardings.state, sharding.replicated(shardings.mesh)), donate_argnums=(0,))


def make_eval_step(model: Transformer, plan: TrainPlan, shardings: StepShardings) -> Callable:
  """(state, frozen, batch [B, L]) -> (state, mean loss, loss tokens) over the global batch, with `state` and
  `frozen` as in `make_train_step` (the state donated: the current rows are written into its stacks in place)."""
  loss = loss_fn(model, plan, rows_already_written=True)

  def step(state: TrainState, frozen, batch):
    state, params = _with_current_rows(plan, state, frozen)
    with sharding.logical_rules(shardings.mesh):
      _, metrics = loss(state.trainable, params, batch)
    return state, metrics["loss"], jnp.sum(batch["loss_mask"])

  replicated = sharding.replicated(shardings.mesh)
  return jax.jit(step, in_shardings=(shardings.state, shardings.frozen, shardings.eval_batch),
                 out_shardings=(shardings.state, replicated, replicated), donate_argnums=(0,))


def train_model(model_config: ModelConfig, plan: TrainPlan, cfg: TrainConfig, mesh: Mesh) -> Transformer:
  """The model a run of `cfg` trains on `mesh`; `plan` names the experts whose weight gradients its kernels
  compute."""
  return Transformer(model_config, expert_impl=cfg.expert_impl, attention_impl=cfg.attention_impl,
                     max_segments=cfg.max_segments, dtype=jnp.dtype(cfg.compute_dtype), remat=cfg.remat,
                     trained_experts=plan.trained_experts, mesh=mesh)


def train_optimizer(plan: TrainPlan, cfg: TrainConfig, params) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer and learning-rate schedule of a run of `cfg` (`params`: arrays or their shapes)."""
  schedule = learning_rate_schedule(cfg.lr, cfg.steps, cfg.schedule, cfg.warmup_steps)
  trainable_like = jax.eval_shape(lambda p: init_trainable(plan, p, jax.random.key(cfg.seed)), params)
  return make_optimizer(trainable_like, schedule, cfg.weight_decay, max_grad_norm=cfg.max_grad_norm), schedule


def _init_state(plan: TrainPlan, optimizer: optax.GradientTransformation, seed: int) -> Callable:
  """(frozen, stacks) -> the step-0 state: the trainable tree, its optimizer state and `stacks` (jit it with the
  stacks donated, so they are passed through, not copied)."""
  def init(frozen, stacks) -> TrainState:
    trainable = init_trainable(plan, plan.experts.join(frozen, stacks), jax.random.key(seed))
    return TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable), stacks)

  return init


def planned_peak_bytes(compiled: jax.stages.Compiled) -> int | None:
  """Device memory of one call as XLA's buffer plan sizes it: arguments, outputs and temporaries, less donated
  buffers; comparable across methods on every backend, unlike the process's memory high-water mark. (The
  analysis' own `peak_memory_in_bytes` leaves temporaries out on CPU.)"""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
             - stats.alias_size_in_bytes)


def _stack_micro_batches(batches: list[Batch]) -> Batch:
  return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def evaluate_loss(eval_step: Callable, state: TrainState, frozen, batches: list[Batch],
                  batch_sharding: NamedSharding) -> tuple[float, TrainState]:
  """Token-weighted mean validation loss over the global batches (each process passes its own rows), and the
  state to use from now on (the eval step donates it)."""
  total, weight = 0.0, 0.0
  for batch in batches:
    state, loss, n = eval_step(state, frozen, sharding.global_batch(batch, batch_sharding))
    total += float(loss) * float(n)
    weight += float(n)
  return total / max(weight, 1.0), state


class Checkpoints:
  """Orbax CheckpointManager over the state's `CHECKPOINTED` fields (step, trainable, optimizer state) plus a JSON
  record of the data position, the best validation loss, the expert config and the run's arguments. Each process
  writes its own shards; `restore` lays them out on the shardings of `like` and keeps its stacks, so a run may
  resume on another mesh."""

  def __init__(self, directory: Path, max_to_keep: int):
    self.directory = directory.resolve()
    self.options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=self.options)

  def save(self, state: TrainState, record: dict) -> None:
    self.manager.save(int(state.step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(_checkpointed(state)), record=ocp.args.JsonSave(record)), force=True)
    self.manager.wait_until_finished()

  def latest(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, like: TrainState) -> tuple[TrainState, dict] | None:
    """The newest checkpoint that restores, or None where there is none. A step that fails to restore (damaged
    or half-copied files) is moved to `corrupt_checkpoints/` beside the checkpoints, saying so, and the step
    before it is tried: left in place, it would collide with the save of that step number."""
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, _checkpointed(like))
    failures = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore()))
      except Exception as e:  # orbax raises JSON, tensorstore and value errors alike for damaged files
        failures.append(f"step {step}: {type(e).__name__}: {str(e)[:300]}")
        self._set_aside(step)
        continue
      if failures:
        print(f"checkpoints in {self.directory} that failed to restore, moved to {self._corrupt_dir}: "
              + "; ".join(failures) + f". Resuming from step {step}, the newest that restores.", flush=True)
      return like._replace(**restored.state), restored.record
    if failures:
      raise ValueError(f"no checkpoint in {self.directory} restores ({'; '.join(failures)}; moved to "
                       f"{self._corrupt_dir}); start the run again with --overwrite")
    return None

  @property
  def _corrupt_dir(self) -> Path:
    return self.directory.parent / "corrupt_checkpoints"

  def _set_aside(self, step: int) -> None:
    """Moves step `step` out of the manager's folder (process 0; every process waits for it)."""
    if jax.process_index() == 0:
      self._corrupt_dir.mkdir(exist_ok=True)
      target = self._corrupt_dir / str(step)
      suffix = 0
      while target.exists():  # a step set aside by an earlier resume keeps its files
        suffix += 1
        target = self._corrupt_dir / f"{step}.{suffix}"
      (self.directory / str(step)).rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"esft-jax: checkpoint {step} set aside")
    self.manager.close()
    self.manager = ocp.CheckpointManager(self.directory, options=self.options)


def _checkpointed(state: TrainState) -> dict:
  return {name: getattr(state, name) for name in CHECKPOINTED}


class NonFiniteError(ValueError):
  """Training produced a NaN or infinite loss, gradient norm or validation loss."""


_QUANTITY = {"loss": "the training loss", "grad_norm": "the gradient norm", "val_loss": "the validation loss"}


@dataclasses.dataclass
class TrainResult:
  trainable: Any
  best_val_loss: float | None
  steps: int  # the step reached
  first_step: int  # the step this call started from (> 0 when it resumed)
  trainable_params: int
  optimizer_state_bytes: int
  wall_seconds: float
  step_peak_bytes: int | None  # the compiled train step's peak device memory as XLA plans it (None: no step ran)


def train(model_config: ModelConfig, frozen_params, plan: TrainPlan, train_batches: Iterator[Batch],
          val_batches: list[Batch], out_dir: Path, cfg: TrainConfig, resume: bool = False,
          on_best: Callable[[Any], None] | None = None, run_record: dict | None = None,
          data_state: Callable[[], Any] | None = None, restore_data: Callable[[Any], None] | None = None,
          mesh: Mesh | None = None, donate_params: bool = False) -> TrainResult:
  """Trains `plan`'s parameters on `mesh` (default: one device). `on_best(trainable)` is called on process 0,
  with host arrays, whenever validation loss improves (the caller writes the adapter). With `resume`,
  continues from the latest checkpoint in `out_dir/checkpoints`, whichever mesh wrote it, restoring the data
  position through `restore_data`. `train_batches` and `val_batches` yield this process's rows.
  `donate_params`: the caller will not use `frozen_params` again, so the stacks that get trained rows are trained
  in place and deleted from it; otherwise training works on a copy of those stacks (ESFT: all routed experts of
  the layers with trained experts)."""
  out_dir = Path(out_dir)
  mesh = mesh or sharding.single_device_mesh()
  is_main = jax.process_index() == 0
  model = train_model(model_config, plan, cfg, mesh)
  fused = resolve_attention_impl(cfg.attention_impl, cfg.compute_dtype) == "fused"

  def check(batch, where):  # the fused attention turns rows past its bound into NaN: stop with the reason first
    if fused:
      check_segments(batch["segment_ids"], cfg.max_segments, where)

  for i, batch in enumerate(val_batches):
    check(batch, f"validation batch {i}")
  optimizer, schedule = train_optimizer(plan, cfg, frozen_params)
  init = _init_state(plan, optimizer, cfg.seed)
  frozen, stacks = plan.experts.split(frozen_params)
  del frozen_params  # from here on the stacks with trained rows are read from the state
  shardings = step_shardings(model_config, plan, mesh, jax.eval_shape(init, frozen, stacks))
  frozen = sharding.place(frozen, shardings.frozen)
  stacks = sharding.place(stacks, shardings.state.stacks)
  if not donate_params:
    stacks = jax.tree_util.tree_map(jnp.copy, stacks)  # the steps donate these; the caller's stay intact
  state = jax.jit(init, out_shardings=shardings.state, donate_argnums=(1,))(frozen, stacks)
  checkpoints = Checkpoints(out_dir / "checkpoints", cfg.max_checkpoints)
  best = None
  restored = checkpoints.restore(state) if resume else None
  if restored is not None:
    state, record = restored
    best = record.get("best_val_loss")
    if restore_data is not None:
      restore_data(record["data_state"])
  # Counted on the host: reading state.step would wait for each step to finish before dispatching the next.
  step = first_step = int(state.step)
  saved_step = first_step if restored is not None else None
  n_trainable = count_parameters(state.trainable)
  opt_bytes = tree_bytes(state.opt_state)
  writer = MetricsWriter(out_dir, first_step) if is_main else None
  if writer:
    writer.text("run", json.dumps({"trainable_params": n_trainable, "optimizer_state_bytes": opt_bytes,
                                   "mesh": sharding.describe(mesh), **(run_record or {})}, indent=1))
    print(f"trainable parameters: {n_trainable:,}; optimizer state: {opt_bytes / 2**20:.1f} MiB; "
          f"mesh {sharding.describe(mesh)}")

  def best_so_far(trainable) -> None:
    if on_best is None:
      return
    host = sharding.to_host(trainable)  # every process takes part in the gather; process 0 writes
    if is_main:
      on_best(host)

  train_step = make_train_step(model, plan, optimizer, schedule, shardings)
  compiled_step, step_peak = None, None
  eval_step = make_eval_step(model, plan, shardings)
  start = time.time()
  tokens_since, time_since = 0, time.time()
  bar = progress(total=cfg.steps, initial=step, desc=f"train {plan.method}")

  def stop_if_not_finite(at_step: int, values: dict) -> None:
    bad = {k: float(values[k]) for k in ("loss", "grad_norm", "val_loss") if k in values}
    bad = {k: v for k, v in bad.items() if not np.isfinite(v)}
    if bad:
      kept = (f"the last good checkpoint, step {saved_step}, is in {checkpoints.directory} (--resume continues "
              "from it once the cause is fixed)" if saved_step is not None else "no checkpoint was saved")
      raise NonFiniteError(
          f"step {at_step}: " + ", ".join(f"{_QUANTITY[k]} is {v}" for k, v in bad.items())
          + f"; training stopped without saving this step or its adapter, and {kept}. Check the model's weights "
          "(esft-jax train checks them unless --no-check-weights) and the data, or lower --lr")

  pending = None  # the last step's metrics, checked once the next step is queued (reading them waits for it)
  try:
    while step < cfg.steps:
      micro = [next(train_batches) for _ in range(cfg.grad_accum)]
      for batch in micro:
        check(batch, f"a training batch of step {step + 1}")
      batch = sharding.global_batch(_stack_micro_batches(micro), shardings.batch)
      if compiled_step is None:  # compiled explicitly once, so its memory plan can be read
        compiled_step = train_step.lower(state, frozen, batch).compile()
        step_peak = planned_peak_bytes(compiled_step)
        memory = memory_plan.plan_of_compiled(compiled_step, state, frozen, mesh,
                                              memory_plan.device_memory_bytes(cfg.device_memory_gib))
        memory_plan.check_fits(memory, cfg.remat, int(batch["inputs"].shape[1]), cfg.grad_accum, mesh.size)
      state, metrics = compiled_step(state, frozen, batch)
      step += 1
      if pending is not None:
        stop_if_not_finite(*pending)
      pending = (step, metrics)
      tokens_since += int(batch["loss_mask"].size)
      bar.update(1)
      logs = step % cfg.log_every == 0 or step == cfg.steps
      evaluates = bool(val_batches) and (step % cfg.eval_every == 0 or step == cfg.steps)
      saves = step % cfg.save_every == 0 or step == cfg.steps
      if logs or evaluates or saves:  # each reads or keeps this step's result: it must be finite first
        stop_if_not_finite(step, metrics)
        pending = None
      if writer and logs:
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["tokens_per_s"] = tokens_since / max(time.time() - time_since, 1e-9)
        metrics["optimizer_state_bytes"] = opt_bytes
        tokens_since, time_since = 0, time.time()
        writer.scalars(step, metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}")
      if evaluates:
        val_loss, state = evaluate_loss(eval_step, state, frozen, val_batches, shardings.eval_batch)
        stop_if_not_finite(step, {"val_loss": val_loss})
        if writer:
          writer.scalars(step, {"val_loss": val_loss})
        if best is None or val_loss < best:
          best = val_loss
          best_so_far(state.trainable)
      if saves:
        checkpoints.save(state, {"best_val_loss": best, "data_state": data_state() if data_state else None,
                                 **(run_record or {})})
        saved_step = step
  finally:
    bar.close()
    if writer:
      writer.close()
  if not val_batches:
    best_so_far(state.trainable)
  return TrainResult(state.trainable, best, step, first_step, n_trainable, opt_bytes, time.time() - start,
                     step_peak)
