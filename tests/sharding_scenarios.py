"""Sharded training, scoring, checkpoints and mesh errors on 8 simulated CPU devices.

tests/test_sharding.py runs this file in subprocesses, because the device count must be fixed before JAX
starts and the rest of the pytest run uses one device. Each group prints one JSON object (what each
case found) and leaves each training run's artifacts in WORK_DIR/<run>/: trainable.npz (the trained tree),
adapter/ and metrics.jsonl, which the test compares across runs.

    python -m tests.sharding_scenarios training|others|experts WORK_DIR
    python -m tests.sharding_scenarios multiprocess WORK_DIR PROCESS_ID PORT   (two processes of 4 devices)
"""

from __future__ import annotations

import os
import sys

GROUP = sys.argv[1] if __name__ == "__main__" else ""
# Compiling is most of this file's run time on a CPU: optimisation level 0 halves it. Single-threaded
# kernels keep the simulated devices from spinning on the few cores a test machine has.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                           " --xla_cpu_multi_thread_eigen=false"
                           f" --xla_force_host_platform_device_count={4 if GROUP == 'multiprocess' else 8}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from esft_jax import sharding  # noqa: E402
from esft_jax.config import config_from_hf, read_hf_config  # noqa: E402
from esft_jax.data.formatting import Example  # noqa: E402
from esft_jax.esft.routing_pass import make_scoring_step, score_examples  # noqa: E402
from esft_jax.esft.scores import RoutingTotals  # noqa: E402
from esft_jax.esft.trainable import init_trainable, plan_from_expert_config  # noqa: E402
from esft_jax.interop.adapter import save_adapter  # noqa: E402
from esft_jax.interop.hf import load_hf_model, save_hf_model  # noqa: E402
from esft_jax.interop.safetensors_io import CheckpointReader  # noqa: E402
from esft_jax.model.moe import routed_experts  # noqa: E402
from esft_jax.model.transformer import init_params  # noqa: E402
from esft_jax.paths import leaves_by_path, set_path  # noqa: E402
from esft_jax.train.optimizer import make_optimizer  # noqa: E402
from esft_jax.train.run import _adapter_base  # noqa: E402
from tests.replay import replay  # noqa: E402
from esft_jax.train.trainer import Checkpoints, TrainConfig, TrainState, step_shardings, train  # noqa: E402

MESHES = ("data=8", "fsdp=8", "data=2,fsdp=2,expert=2", "data=2,tensor=4")
RESUMED = "data=2,fsdp=2,expert=2"  # two steps on this mesh, the third on one device from its checkpoint
BATCH, LENGTH, STEPS = 8, 12, 3
PLAN = plan_from_expert_config({"experts": {"1": [3, 0]}, "shared_experts": True})
_COMPILES = [0]


def _count_compiles(event: str, duration_secs: float, **kwargs) -> None:
  if event == "/jax/core/compile/backend_compile_duration":
    _COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compiles)


def _batches(vocab: int, n: int, seed: int) -> list[dict[str, np.ndarray]]:
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    tokens = rng.integers(3, vocab, size=(BATCH, LENGTH + 1)).astype(np.int32)
    segments = np.ones((BATCH, LENGTH), np.int32)
    segments[::3, -4:] = 0  # some padding
    out.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                "loss_mask": (rng.random((BATCH, LENGTH)) < 0.7).astype(np.float32) * (segments != 0),
                "segment_ids": segments,
                "positions": np.broadcast_to(np.arange(LENGTH, dtype=np.int32), (BATCH, LENGTH)).copy()})
  return out


def _mesh(spec: str | None):
  return None if spec is None else sharding.make_mesh(sharding.parse_mesh(spec))


def _mesh_of_first(spec: str):
  """A mesh over only as many devices as its axes need."""
  axes = sharding.parse_mesh(spec)
  return sharding.make_mesh(axes, jax.devices()[:math.prod(axes.values())])


def _like(tree):
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _adapter(directory: Path) -> dict[str, np.ndarray]:
  reader = CheckpointReader(directory)
  return {name: np.asarray(reader.get(name)) for name in reader.keys()}


def _max_diff(a, b) -> float:
  diffs = jax.tree_util.tree_map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
  return max(jax.tree_util.tree_leaves(diffs))


def run(cfg, params, out_dir: Path, mesh_spec: str | None, steps: int, rows: slice = slice(None),
        resume: bool = False) -> dict:
  """ESFT training as `esft-jax train` runs it (adapter written by process 0 without gathering the frozen
  model); this process feeds `rows` of every global batch."""
  batches = [{k: v[rows] for k, v in b.items()} for b in _batches(cfg.vocab_size, 6, seed=1)]
  val = [{k: v[rows] for k, v in b.items()} for b in _batches(cfg.vocab_size, 1, seed=2)]
  stream, data_state, restore = replay(batches)

  def on_best(trainable):
    save_adapter(out_dir / "adapter", cfg, _adapter_base(_like(params), trainable), PLAN, trainable)

  config = TrainConfig(steps=steps, lr=1e-3, grad_accum=2, eval_every=1, save_every=2, log_every=1,
                       compute_dtype="float32")
  result = train(cfg, params, PLAN, stream, val, out_dir, config, resume=resume, mesh=_mesh(mesh_spec),
                 on_best=on_best, data_state=data_state, restore_data=restore)
  trained = sharding.to_host(result.trainable)
  if jax.process_index() == 0:
    np.savez(out_dir / "trainable.npz", **leaves_by_path(trained))
  specs = {p: str(leaf.sharding.spec) for p, leaf in leaves_by_path(result.trainable).items()}
  return {"steps": result.steps, "devices": len(jax.tree_util.tree_leaves(result.trainable)[0].sharding.device_set),
          "slice_spec": specs["layers_1/mlp/experts/gate_proj"],
          "shared_spec": specs["layers_1/mlp/shared_experts/gate_proj/kernel"]}


def training(cfg, params, work: Path, specs: tuple[str | None, ...]) -> dict:
  """Three ESFT steps per mesh (the test compares them with the one-device run "single")."""
  out = {}
  for spec in specs:
    if spec == RESUMED:
      out[f"{spec} first"] = run(cfg, params, work / spec, spec, STEPS - 1)
      out[spec] = run(cfg, params, work / spec, None, STEPS, resume=True)
    else:
      out[spec or "single"] = run(cfg, params, work / (spec or "single"), spec, STEPS)
  return out


def stand_in_adapter(cfg, params, work: Path) -> dict:
  """The adapter written with host zeros in place of the frozen model equals the one written from it."""
  trained = dict(np.load(work / "single" / "trainable.npz"))
  nested: dict = {}
  for path, value in trained.items():
    set_path(nested, path, value)
  save_adapter(work / "direct", cfg, jax.tree_util.tree_map(jnp.asarray, params), PLAN, nested)
  save_adapter(work / "stand_in", cfg, _adapter_base(_like(params), nested), PLAN, nested)
  direct, stand_in = _adapter(work / "direct"), _adapter(work / "stand_in")
  same = sorted(direct) == sorted(stand_in)
  return {"same_names": same, "tensors": len(direct), "diff": _max_diff(direct, stand_in) if same else None}


def checkpoints(cfg, params, work: Path) -> dict:
  """Exact round trips of a TrainState through orbax between a one-device and an 8-device layout."""
  trainable = init_trainable(PLAN, params)
  trainable = jax.tree_util.tree_map(lambda x: x + jnp.arange(x.size, dtype=x.dtype).reshape(x.shape), trainable)
  optimizer = make_optimizer(trainable, lambda step: 1e-3)
  _, stacks = PLAN.experts.split(params)
  state = TrainState(jnp.asarray(7, jnp.int32), trainable, optimizer.init(trainable), stacks)
  state = state._replace(opt_state=jax.tree_util.tree_map(lambda x: x + 0.5, state.opt_state))
  out = {}
  for name, source, target in (("1_to_8", None, "data=2,fsdp=2,expert=2"), ("8_to_1", "fsdp=8", None)):
    laid = _laid_out(cfg, state, source)
    store = Checkpoints(work / f"ckpt_{name}", 2)
    store.save(laid, {"note": name})
    restored, record = store.restore(_laid_out(cfg, jax.tree_util.tree_map(jnp.zeros_like, state), target))
    mesh = sharding.single_device_mesh() if target is None else _mesh(target)
    expected = step_shardings(cfg, PLAN, mesh, restored).state
    same_layout = all(a.sharding.is_equivalent_to(b, a.ndim) for a, b in
                      zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(expected)))
    saved = lambda s: s._replace(stacks={})  # the stacks are the model's, not checkpointed: restored as given
    out[name] = {"diff": _max_diff(saved(state), saved(restored)), "layout": same_layout, "record": record["note"]}
  return out


def _laid_out(cfg, state: TrainState, spec: str | None) -> TrainState:
  mesh = sharding.single_device_mesh() if spec is None else _mesh(spec)
  return sharding.place(state, step_shardings(cfg, PLAN, mesh, state).state)


def _examples(cfg) -> list[Example]:
  rng = np.random.default_rng(3)
  return [Example(rng.integers(3, cfg.vocab_size, size=n).astype(np.int32), np.ones(n, np.float32), "t")
          for n in rng.integers(4, 17, size=13)]


def scoring(cfg, params) -> dict:
  """Routing totals of one batch on each mesh against one device (counts exactly), and the whole `score`
  path (placement, batching, summary.json) on one mesh."""
  examples = _examples(cfg)
  tokens = np.zeros((BATCH, 16), np.int32)
  segments = np.zeros_like(tokens)
  for i, e in enumerate(examples[:BATCH]):
    tokens[i, :len(e)], segments[i, :len(e)] = e.ids_L, 1

  def totals_on(mesh):
    step = make_scoring_step(cfg, mesh=mesh)
    zeros = RoutingTotals.zeros(len(cfg.moe_layer_ids), cfg.num_experts)
    rows = sharding.batch_sharding(mesh)
    return step(sharding.place(params, sharding.param_shardings(cfg, mesh)),
                sharding.place(zeros, sharding.replicated(mesh)), sharding.place(tokens, rows),
                sharding.place(segments, rows))[0]

  reference = totals_on(sharding.single_device_mesh())
  out = {}
  for spec in MESHES:
    totals = totals_on(_mesh(spec))
    out[spec] = {"counts_equal": bool(np.array_equal(totals.token_counts, reference.token_counts)
                                      and int(totals.n_tokens) == int(reference.n_tokens)),
                 "gate_diff": float(np.max(np.abs(np.asarray(totals.gate_sums) - np.asarray(reference.gate_sums)))),
                 "replicated": totals.token_counts.sharding.is_fully_replicated}
  out["summary"] = score_examples(cfg, params, examples, batch_size=BATCH)
  out["summary_equal"] = score_examples(cfg, params, examples, batch_size=BATCH, mesh=_mesh(MESHES[2])) == \
      out["summary"]
  return out


def errors() -> dict:
  """Each bad setting must fail with a clear message before anything compiles."""
  six_experts = _config(n_routed_experts=6)
  narrow = _config(hidden_size=100)
  cases = {
      "product": lambda: sharding.make_mesh(sharding.parse_mesh("data=2,fsdp=2")),
      "minus_one": lambda: sharding.make_mesh(sharding.parse_mesh("data=3,fsdp=-1")),
      "experts": lambda: sharding.param_shardings(six_experts, _mesh("data=2,expert=4")),
      "width": lambda: sharding.param_shardings(narrow, _mesh("fsdp=8")),
      "batch": lambda: sharding.check_batch_size(6, _mesh("data=2,fsdp=4")),
      "train": lambda: train(six_experts, jax.eval_shape(lambda: init_params(six_experts, jax.random.key(0))),
                             plan_from_expert_config({"experts": {"1": [1]}}), iter(()), [], Path("/nonexistent"),
                             TrainConfig(steps=1), mesh=_mesh("expert=4,data=2")),
  }
  out = {}
  for name, case in cases.items():
    before = _COMPILES[0]
    try:
      case()
      out[name] = {"error": None}
    except ValueError as e:
      out[name] = {"error": str(e), "compiles": _COMPILES[0] - before}
  return out


def loading(cfg, params, work: Path) -> dict:
  """A checkpoint loaded straight onto a mesh: each tensor on its sharding, each device holding only its shard,
  the values those of a plain load."""
  model_dir = save_hf_model(work / "hf", cfg, params, _hf_config())
  plain = leaves_by_path(load_hf_model(model_dir).params)
  out = {}
  for spec in ("fsdp=8", RESUMED):
    expected = leaves_by_path(sharding.param_shardings(cfg, _mesh(spec)))
    loaded = leaves_by_path(load_hf_model(model_dir, shardings=sharding.param_shardings(cfg, _mesh(spec))).params)
    shard_shape = {p: expected[p].shard_shape(plain[p].shape) for p in plain}
    out[spec] = {
        "placed": all(loaded[p].sharding == expected[p] for p in plain),
        "equal": all(np.array_equal(np.asarray(loaded[p]), np.asarray(plain[p])) for p in plain),
        "shards_only": all(s.data.shape == shard_shape[p] for p in plain for s in loaded[p].addressable_shards),
        "split": sum(shard_shape[p] != plain[p].shape for p in plain)}
  return out


def multiprocess(cfg, params, work: Path) -> dict:
  """Two processes of 4 devices, as on two hosts: each feeds its own half of every global batch, both score
  the same examples; process 0 alone writes."""
  half = BATCH // 2
  rows = slice(jax.process_index() * half, (jax.process_index() + 1) * half)
  mesh_spec = "data=2,fsdp=4"
  return {"processes": jax.process_count(), "run": run(cfg, params, work / "two_processes", mesh_spec, STEPS, rows),
          "summary": score_examples(cfg, params, _examples(cfg), batch_size=BATCH, mesh=_mesh(mesh_spec))}


EXPERT_MESHES = ("expert=2", "expert=4", "data=2,expert=2", "fsdp=2,expert=2", "expert=2,tensor=2")


def expert_parallel() -> dict:
  """The routed experts on meshes with an expert axis, which moves tokens instead of weights: the largest
  difference from one device, relative to the largest value, of the output and the gradients of the input, the
  router and the expert weights (random values, a linear loss so every assignment counts); the shapes of every
  all-gather in the compiled gradient; and for ESFT (3 experts trained) the same differences ("trained_diffs", the
  trained experts' weight gradients only) and the shapes every sum over devices reduces ("reduced"); and the
  same with the trained rows given apart from the stacks, as the train step gives them ("rows_diffs",
  "rows_reduced")."""
  rng = np.random.default_rng(5)
  t, k, e, d, f = 32, 3, 8, 16, 12
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[-2]), jnp.float32)
  x, router, cotangent = normal(t, d), normal(d, e), normal(t, d)
  experts = {"gate_proj": normal(e, d, f), "up_proj": normal(e, d, f), "down_proj": normal(e, f, d)}

  def out_and_grads(mesh, impl, trained=None, rows_apart=False):
    """With `rows_apart`, the gradients of the trained rows given apart from the stacks, in place of the stacks'."""
    def loss(x, router, differentiated):
      weights, ids = jax.lax.top_k(jax.nn.softmax(x @ router), k)
      stacks, rows = (experts, differentiated) if rows_apart else (differentiated, None)
      out = routed_experts(x, ids.astype(jnp.int32), weights, stacks, impl, trained, mesh, rows)
      return jnp.sum(out * cotangent), out

    def step(*args):
      return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(*args)

    differentiated = {n: stack[jnp.asarray(trained)] for n, stack in experts.items()} if rows_apart else experts
    args = (x, router, differentiated)
    if mesh is not None:
      stacks = jax.sharding.NamedSharding(mesh, sharding.mesh_axes(jax.sharding.PartitionSpec("experts", "embed",
                                                                                              "mlp")))
      args = (sharding.place(x, sharding.batch_sharding(mesh)), sharding.place(router, sharding.replicated(mesh)),
              sharding.place(differentiated, sharding.replicated(mesh) if rows_apart else stacks))
    return jax.jit(step), args

  def largest_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v))) / np.max(np.abs(np.asarray(v))))
               for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))

  diffs: dict = {}
  for impl in ("reference", "grouped"):
    step, args = out_and_grads(None, impl)
    whole = step(*args)
    for spec in EXPERT_MESHES:
      step, args = out_and_grads(_mesh_of_first(spec), impl)
      diffs.setdefault(impl, {})[spec] = largest_diff(step(*args), whole)

  def shapes_of(op: str, hlo: str) -> list[list[int]]:  # the result shapes of every `op` in a compiled program
    return [[int(n) for n in dims.split(",")] for line in hlo.splitlines() if f" {op}(" in line
            for dims in re.findall(r"\[([\d,]+)\]", line.split(f" {op}(")[0])]

  gathers = {}
  for spec in ("expert=2", "fsdp=2,expert=2"):
    step, args = out_and_grads(_mesh_of_first(spec), "grouped")
    gathers[spec] = shapes_of("all-gather", step.lower(*args).compile().as_text())

  # ESFT (experts 1, 5 and 6 trained), the weights moved: the output, the gradients of the input and the router,
  # and the trained experts' weight gradients, as on one device; and the shapes every sum over devices reduces
  trained = (1, 5, 6)

  def used(grads_and_out, rows_apart=False):  # the trained experts' rows of the weight gradients
    (grad_x, grad_router, grad_experts), out = grads_and_out
    if not rows_apart:
      grad_experts = {n: np.asarray(g)[list(trained)] for n, g in grad_experts.items()}
    return grad_x, grad_router, grad_experts, out

  step, args = out_and_grads(None, "grouped", trained)
  whole = used(step(*args))
  found = {"trained_diffs": {}, "reduced": {}, "rows_diffs": {}, "rows_reduced": {}}
  # The rows given apart on a mesh where data axes sum their gradients and on one where only the expert axis splits
  # (the train step's other meshes: test_sharded_esft_steps_equal_one_device)
  cases = [(spec, False) for spec in ("data=2", "fsdp=2", "data=2,tensor=2", "data=2,expert=2", "fsdp=2,expert=2",
                                      "expert=2")] + [("fsdp=2,expert=2", True), ("expert=2", True)]
  for spec, rows_apart in cases:
    diffs_key, reduced_key = ("rows_diffs", "rows_reduced") if rows_apart else ("trained_diffs", "reduced")
    step, args = out_and_grads(_mesh_of_first(spec), "grouped", trained, rows_apart)
    compiled = step.lower(*args).compile()  # run and read alike, compiled once
    found[diffs_key][spec] = largest_diff(used(compiled(*args), rows_apart), whole)
    hlo = compiled.as_text()
    found[reduced_key][spec] = shapes_of("all-reduce", hlo) + shapes_of("reduce-scatter", hlo)
  return {"diffs": diffs, "gathers": gathers, **found}


def _hf_config(**overrides) -> dict:
  """tiny-deepseek cut to a dense layer and an MoE layer (compile time grows with depth)."""
  return {**read_hf_config("tiny-deepseek"), "num_hidden_layers": 2, **overrides}


def _config(**overrides):
  return config_from_hf(_hf_config(**overrides))


def main(group: str, work: Path, *process: str) -> None:
  """Groups, so that the test can run them side by side on two cores."""
  if group == "multiprocess":  # before JAX computes anything
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{process[1]}", num_processes=2, process_id=int(process[0]))
  if group == "experts":  # no model
    print(json.dumps({"devices": jax.device_count(), "expert_parallel": expert_parallel()}))
    return
  cfg = _config()
  # On the host, like a loaded checkpoint: placing host arrays on a mesh compiles nothing.
  params = jax.device_get(jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0)))
  if group == "multiprocess":
    results = {f"process{jax.process_index()}": multiprocess(cfg, params, work)}
  elif group == "training":
    results = {"runs": training(cfg, params, work, (None, "data=8", "fsdp=8"))}
    results["stand_in_adapter"] = stand_in_adapter(cfg, params, work)
  else:
    results = {"errors": errors(), "scoring": scoring(cfg, params), "checkpoints": checkpoints(cfg, params, work),
               "loading": loading(cfg, params, work),
               "runs": training(cfg, params, work, ("data=2,tensor=4", RESUMED))}
  print(json.dumps({"devices": jax.device_count(), **results}))


if __name__ == "__main__":
  main(GROUP, Path(sys.argv[2]), *sys.argv[3:])
