"""Meshes, the rules table, and sharded ESFT training and scoring against one device.

The 8-device scenarios run in subprocesses side by side (tests/sharding_scenarios.py): the simulated device
count is fixed when JAX starts, and this pytest process runs on one device. Two of them form one distributed
run of two processes with 4 devices each, as two hosts would. The rest runs here on abstract meshes, which
need no devices, except a check of the GPU expert kernels split over two GPUs, where there are two.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec as P

from esft_jax import sharding
from esft_jax.cli import main
from esft_jax.config import config_from_hf, load_config, read_hf_config
from esft_jax.esft.trainable import init_trainable, plan_from_expert_config
from esft_jax.interop.safetensors_io import CheckpointReader
from esft_jax.model.kernels import hopper_available
from esft_jax.model.moe import routed_experts
from esft_jax.model.transformer import Transformer, init_params
from esft_jax.paths import leaves_by_path
from esft_jax.train.memory_plan import BATCH_KEYS
from esft_jax.train.trainer import loss_fn
from tests.jaxprs import arrays_made

REPO = Path(__file__).resolve().parents[1]
MESHES = ("data=8", "fsdp=8", "data=2,fsdp=2,expert=2", "data=2,tensor=4")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory) -> dict:
  """Runs the scenario groups side by side; returns their findings, with `runs` mapping each training run
  to its findings and `dir` (trainable.npz, adapter/, metrics.jsonl)."""
  root = tmp_path_factory.mktemp("sharding")
  # A shared compilation cache: the groups compile some identical programs (the one-device steps).
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(root / "xla_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  port = str(_free_port())
  commands = {"training": ["training", "training"], "others": ["others", "others"],
              "process0": ["multiprocess", "multiprocess", "0", port],
              "process1": ["multiprocess", "multiprocess", "1", port]}
  started = {}
  for name, (group, work, *process) in commands.items():
    (root / work).mkdir(exist_ok=True)
    with open(root / f"{name}.out", "w") as out, open(root / f"{name}.err", "w") as err:
      started[name] = subprocess.Popen([sys.executable, "-m", "tests.sharding_scenarios", group, str(root / work),
                                        *process], cwd=REPO, env=env, stdout=out, stderr=err)
  results: dict = {"runs": {}}
  for name, process in started.items():
    if process.wait(timeout=900):
      pytest.fail(f"{name} scenarios exited with {process.returncode}:\n"
                  f"{(root / f'{name}.err').read_text()[-5000:]}")
    found = json.loads((root / f"{name}.out").read_text().strip().splitlines()[-1])
    assert found.pop("devices") == 8
    for run, finding in found.pop("runs", {}).items():
      results["runs"][run] = {**finding, "dir": root / commands[name][1] / run.removesuffix(" first")}
    if name.startswith("process"):
      found[name]["run"]["dir"] = root / "multiprocess" / "two_processes"
    results.update(found)
  return results


@pytest.fixture(scope="module")
def expert_parallel(tmp_path_factory) -> dict:
  """The routed experts on meshes with an expert axis (tests/sharding_scenarios.py, group "experts")."""
  work = tmp_path_factory.mktemp("experts")
  done = subprocess.run([sys.executable, "-m", "tests.sharding_scenarios", "experts", str(work)], cwd=REPO,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=300)
  if done.returncode:
    pytest.fail(f"expert scenarios exited with {done.returncode}:\n{done.stderr[-5000:]}")
  found = json.loads(done.stdout.strip().splitlines()[-1])
  assert found["devices"] == 8
  return found["expert_parallel"]


def _trainable(run: dict) -> dict[str, np.ndarray]:
  return dict(np.load(run["dir"] / "trainable.npz"))


def _metrics(run: dict) -> list[dict]:
  return [json.loads(line) for line in (run["dir"] / "metrics.jsonl").read_text().splitlines()]


def _adapter(run: dict) -> dict[str, np.ndarray]:
  reader = CheckpointReader(run["dir"] / "adapter")
  return {name: np.asarray(reader.get(name)) for name in reader.keys()}


def _metric_diff(a: list[dict], b: list[dict]) -> float:
  assert [(line["step"], sorted(line)) for line in a] == [(line["step"], sorted(line)) for line in b]
  return max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in ("loss", "grad_norm", "val_loss", "aux_loss") if k in x)


def _same_as_one_device(scenarios: dict, run: dict) -> None:
  """Three ESFT steps of two micro-batches, each followed by a validation pass, as on one device."""
  single = scenarios["runs"]["single"]
  assert run["steps"] == 3
  # Loss, balance loss, gradient norm and validation loss agree to fp32 rounding (values near 6).
  assert _metric_diff(_metrics(single), _metrics(run)) < 1e-5
  # Adam divides by the gradient's running RMS, which magnifies rounding where a gradient nearly cancels
  # between steps; the bound is a tenth of one step's update (lr 1e-3), far below any sharding bug.
  chex.assert_trees_all_close(_trainable(run), _trainable(single), atol=1e-4, rtol=0)
  chex.assert_trees_all_close(_adapter(run), _adapter(single), atol=1e-4, rtol=0)


def _abstract_mesh(**sizes: int) -> AbstractMesh:
  axes = {**dict.fromkeys(sharding.MESH_AXES, 1), **sizes}
  return AbstractMesh(tuple(axes.values()), tuple(axes), axis_types=(AxisType.Auto,) * len(axes))


def test_parse_mesh():
  assert sharding.parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4, "expert": 1, "tensor": 1}
  assert sharding.parse_mesh(" expert=2 , fsdp=-1 ") == {"data": 1, "fsdp": -1, "expert": 2, "tensor": 1}
  assert sharding.parse_mesh("") == dict.fromkeys(sharding.MESH_AXES, 1)
  for spec, message in [("pipe=2", "unknown axis 'pipe'"), ("data=2,data=4", "given twice"),
                        ("data=two", "integer size"), ("data=0", "data=0"), ("data=-1,fsdp=-1", "at most one")]:
    with pytest.raises(ValueError, match=message):
      sharding.parse_mesh(spec)


def test_rules_table_separates_parameters_from_activations():
  # Parameters: FSDP on embed (or on the MLA rank where there is no embed), experts on expert, widths on tensor.
  assert sharding.mesh_axes(P("experts", "embed", "mlp")) == P("expert", "fsdp", "tensor")
  assert sharding.mesh_axes(P("vocab", "embed")) == P("tensor", "fsdp")
  assert sharding.mesh_axes(P("kv_lora", "heads")) == P("fsdp", "tensor")
  assert sharding.mesh_axes(P("embed", "kv_lora")) == P("fsdp", None)
  # Activations: batch over every data-like axis, so embed (fsdp already taken) stays whole.
  assert sharding.mesh_axes(P("batch", "length", "embed")) == P(sharding.BATCH_AXES, None, None)
  assert sharding.mesh_axes(P("batch", "length", "heads", "head_dim")) == P(sharding.BATCH_AXES, None, "tensor",
                                                                              None)


def test_deepseek_v2_lite_shards_every_matrix_on_fsdp_for_a_pod_mesh():
  shardings = sharding.param_shardings(load_config("deepseek-v2-lite"), _abstract_mesh(data=2, fsdp=16, expert=8,
                                                                                        tensor=4))
  for path, named in leaves_by_path(shardings).items():
    if path.endswith("/kernel") or "/experts/" in path or path == "embed_tokens":
      assert "fsdp" in named.spec, path
    if "/mlp/experts/" in path:
      assert named.spec[0] == "expert", path


def test_indivisible_dimension_names_parameter_dimension_and_axis():
  with pytest.raises(ValueError, match=r"layers_1/mlp/experts/\w+: dimension 0 \(experts, size 16\) is split over "
                                       r"mesh axis expert of size 32"):
    sharding.param_shardings(load_config("tiny-deepseek"), _abstract_mesh(expert=32))


def test_cli_rejects_a_mesh_that_does_not_fit_the_devices(tmp_path, capsys):
  for command in (["score", "--model", tmp_path, "--data", tmp_path / "x.jsonl", "--n-tokens", 10],
                  ["train", "--model", tmp_path, "--data", tmp_path / "x.jsonl", "--method", "fft"]):
    with pytest.raises(SystemExit) as exit_info:
      main([str(a) for a in command] + ["--out", str(tmp_path / "out"), "--mesh", "data=2,fsdp=3"])
    assert exit_info.value.code == 2
    assert "mesh data=2,fsdp=3,expert=1,tensor=1 needs 6 devices, but there are" in capsys.readouterr().err


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_esft_steps_equal_one_device(scenarios, mesh):
  _same_as_one_device(scenarios, scenarios["runs"][mesh])


def test_trainable_expert_slice_is_sharded_on_its_width(scenarios):
  for mesh in MESHES:
    run = scenarios["runs"][mesh]
    assert run["slice_spec"] == "P(None, 'fsdp', 'tensor')"  # [n_selected, D, F]: never on n_selected
    assert run["shared_spec"] == "P('fsdp', 'tensor')"


def test_adapter_written_without_the_frozen_model_is_identical(scenarios):
  stand_in = scenarios["stand_in_adapter"]
  assert stand_in["same_names"] and stand_in["diff"] == 0.0 and stand_in["tensors"] == 9  # 2 experts + shared


def test_training_on_8_devices_resumes_on_1(scenarios):
  # data=2,fsdp=2,expert=2 took two steps on 8 devices and the third on one device from its checkpoint;
  # test_sharded_esft_steps_equal_one_device compares the result with three steps on one device.
  first, resumed = scenarios["runs"]["data=2,fsdp=2,expert=2 first"], scenarios["runs"]["data=2,fsdp=2,expert=2"]
  assert (first["steps"], first["devices"]) == (2, 8)
  assert (resumed["steps"], resumed["devices"]) == (3, 1)
  assert scenarios["runs"]["data=8"]["devices"] == 8


@pytest.mark.parametrize("direction", ["1_to_8", "8_to_1"])
def test_checkpoint_restores_exactly_onto_another_mesh(scenarios, direction):
  result = scenarios["checkpoints"][direction]
  assert result["diff"] == 0.0 and result["layout"] and result["record"] == direction


@pytest.mark.parametrize("mesh", ["fsdp=8", "data=2,fsdp=2,expert=2"])
def test_checkpoint_loads_straight_onto_a_mesh(scenarios, mesh):
  result = scenarios["loading"][mesh]
  assert result["placed"] and result["equal"] and result["shards_only"] and result["split"] > 0


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_scoring_equals_one_device(scenarios, mesh):
  result = scenarios["scoring"][mesh]
  assert result["counts_equal"] and result["replicated"]
  assert result["gate_diff"] < 1e-5  # float sums in another order


def test_sharded_score_summary_is_identical(scenarios):
  assert scenarios["scoring"]["summary_equal"]


def test_two_processes_train_and_score_like_one_device(scenarios):
  for process in ("process0", "process1"):
    assert scenarios[process]["processes"] == 2
    assert scenarios[process]["summary"] == scenarios["scoring"]["summary"]  # every process holds it
  _same_as_one_device(scenarios, scenarios["process0"]["run"])  # artifacts written by process 0


@pytest.mark.parametrize("case, message", [
    ("product", "mesh data=2,fsdp=2,expert=1,tensor=1 needs 4 devices, but there are 8"),
    ("minus_one", "8 devices do not split into groups of 3 for fsdp=-1"),
    ("experts", "layers_1/mlp/experts/down_proj: dimension 0 (experts, size 6) is split over mesh axis expert of "
                "size 4"),
    ("width", "embed_tokens: dimension 1 (embed, size 100) is split over mesh axis fsdp of size 8"),
    ("batch", "--batch-size 6 does not split over the mesh's batch axes"),
    ("train", "dimension 0 (experts, size 6) is split over mesh axis expert of size 4"),
])
def test_bad_meshes_fail_before_compiling(scenarios, case, message):
  result = scenarios["errors"][case]
  assert result["error"] is not None and message in result["error"], result
  assert result["compiles"] == 0


@pytest.mark.parametrize("impl", ["reference", "grouped"])
@pytest.mark.parametrize("mesh", ["expert=2", "expert=4", "data=2,expert=2", "fsdp=2,expert=2"])
def test_expert_parallel_routed_experts_equal_one_device(expert_parallel, impl, mesh):
  # Output and gradients of the input, router and expert weights, relative to their largest value.
  assert expert_parallel["diffs"][impl][mesh] < 1e-5


def test_expert_axis_moves_tokens_not_expert_weights(expert_parallel):
  """No all-gather in the compiled gradient yields a whole expert stack (8 experts of [16, 12] or [12, 16])."""
  gathers = expert_parallel["gathers"]
  for shapes in gathers.values():
    assert [8, 16, 12] not in shapes and [8, 12, 16] not in shapes, shapes
  assert [32, 16] in gathers["expert=2"]  # the 16 tokens of each of the two devices
  assert [4, 16, 12] in gathers["fsdp=2,expert=2"]  # a device's own 4 experts, from their FSDP shards


@pytest.mark.parametrize("mesh", ["data=2", "fsdp=2", "data=2,tensor=2", "data=2,expert=2", "fsdp=2,expert=2"])
def test_data_axes_sum_only_the_trained_experts_weight_gradients(expert_parallel, mesh):
  """ESFT (3 of 8 experts trained) where data axes sum the weight gradients over devices: every sum in the compiled
  gradient that holds weights holds the 3 trained experts' rows, never a stack (8 experts, or an expert group's 4);
  the trained experts' gradients, the input's and the router's as on one device."""
  weights = [shape for shape in expert_parallel["reduced"][mesh] if len(shape) == 3]
  assert weights and all(shape[0] == 3 for shape in weights), weights
  assert expert_parallel["trained_diffs"][mesh] < 1e-5


def test_expert_axis_alone_trains_the_named_experts_as_one_device(expert_parallel):
  assert expert_parallel["trained_diffs"]["expert=2"] < 1e-5


@pytest.mark.parametrize("mesh", ["fsdp=2,expert=2", "expert=2"])
def test_trained_rows_given_apart_train_as_one_device(expert_parallel, mesh):
  """The trained rows given apart from the stacks, as the train step gives them: their gradients, the input's and
  the router's as on one device; every sum over devices that holds weights holds the rows alone."""
  assert expert_parallel["rows_diffs"][mesh] < 1e-5
  weights = [shape for shape in expert_parallel["rows_reduced"][mesh] if len(shape) == 3]
  assert weights and all(shape[0] == 3 for shape in weights), weights


@pytest.mark.parametrize("mesh", [{"data": 2}, {"fsdp": 2, "tensor": 2}, {"expert": 2}],
                         ids=["data=2", "fsdp=2,tensor=2", "expert=2"])
def test_sharded_esft_gradient_makes_no_stack_sized_cotangent(mesh):
  """The ESFT loss's gradient on a mesh, 2 of 64 experts trained: the trained rows reach the routed experts'
  per-device program as values of their own, so outside it nothing of a stack's shape is made. Rows sliced from
  the stacks inside the differentiated program would scatter their gradient into a zero fp32 stack of each, for
  every MoE layer."""
  cfg = config_from_hf({**read_hf_config("tiny-deepseek"), "num_hidden_layers": 2, "n_routed_experts": 64})
  plan = plan_from_expert_config({"experts": {"1": [5, 40]}})
  params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  trainable = jax.eval_shape(lambda p: init_trainable(plan, p), params)
  batch = {key: jax.ShapeDtypeStruct((4, 8), dtype) for key, dtype in BATCH_KEYS.items()}
  model = Transformer(cfg, trained_experts=plan.trained_experts, mesh=_abstract_mesh(**mesh))
  grad = jax.grad(lambda t, p, b: loss_fn(model, plan, rows_already_written=True)(t, p, b)[0])
  made = arrays_made(jax.make_jaxpr(grad)(trainable, params, batch), outside="shard_map")
  assert "shard_map" in [name for name, _ in made]  # the routed experts split over the mesh
  stacks = {leaf.shape for path, leaf in leaves_by_path(params).items() if "/mlp/experts/" in path}
  assert not [(name, aval) for name, aval in made if aval.shape in stacks]


@pytest.mark.skipif(not (hopper_available() and jax.device_count() >= 2), reason="needs two Hopper GPUs")
@pytest.mark.parametrize("trained", [None, (1, 5, 6)], ids=["all", "esft"])
@pytest.mark.parametrize("spec", ["data=2", "expert=2"])
def test_gpu_expert_kernels_on_two_gpus_match_one(spec, trained):
  """The Pallas expert kernels inside the MoE's shard_map, tokens split over two GPUs (data=2: the weights
  gathered from their shards; expert=2: the tokens gathered, each GPU on its 4 experts): values and gradients as
  on one GPU (bf16). With ESFT's trained experts (1 on the first GPU, 5 and 6 on the second) only their weight
  gradients are computed and compared: the frozen experts' entries are left unwritten (see expert_ffn)."""
  rng = np.random.default_rng(0)
  t, k, e, d, f = 512, 6, 8, 256, 256
  x = jnp.asarray(rng.standard_normal((t, d)), jnp.bfloat16)
  ids = jnp.asarray(np.argsort(rng.random((t, e)), axis=1)[:, :k], jnp.int32)
  weights = jnp.asarray(rng.random((t, k)), jnp.float32)
  experts = {name: jnp.asarray(rng.standard_normal(shape) / 16, jnp.bfloat16)
             for name, shape in (("gate_proj", (e, d, f)), ("up_proj", (e, d, f)), ("down_proj", (e, f, d)))}

  def value_and_grads(mesh_spec: str):
    axes = sharding.parse_mesh(mesh_spec)
    mesh = sharding.make_mesh(axes, jax.devices()[:math.prod(axes.values())])
    rows, stacks = NamedSharding(mesh, P(sharding.BATCH_AXES)), NamedSharding(mesh, P("expert"))

    def loss(x, weights, experts):
      return jnp.sum(routed_experts(x, ids, weights, experts, "gpu", trained, mesh).astype(jnp.float32) ** 2)

    args = (jax.device_put(x, rows), jax.device_put(weights, rows), jax.device_put(experts, stacks))
    return jax.device_get(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(*args))

  def used(run):  # the value and the gradients the caller reads
    value, (grad_x, grad_weights, grad_experts) = run
    if trained:
      grad_experts = {name: np.asarray(grad)[list(trained)] for name, grad in grad_experts.items()}
    return value, grad_x, grad_weights, grad_experts

  split_run, one_gpu_run = used(value_and_grads(spec)), used(value_and_grads("data=1"))
  for split, whole in zip(jax.tree_util.tree_leaves(split_run), jax.tree_util.tree_leaves(one_gpu_run)):
    split, whole = np.asarray(split, np.float32), np.asarray(whole, np.float32)
    assert np.abs(split - whole).max() <= 2e-2 * np.abs(whole).max()
  for name, grad in split_run[3].items():
    assert np.all(np.abs(np.asarray(grad, np.float32)).max(axis=(1, 2)) > 0), name
