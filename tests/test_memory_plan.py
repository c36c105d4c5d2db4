"""The training step's memory plan: `esft-jax train --plan` on simulated devices, the plan's parts against counts
made here, the abstract step against the one a run compiles, and a run that does not fit stopping before its first
step."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esft_jax import sharding
from esft_jax.config import config_from_hf, load_config
from esft_jax.esft.trainable import plan_from_expert_config, tree_bytes
from esft_jax.interop.hf import load_hf_model
from esft_jax.model.transformer import init_params
from esft_jax.paths import leaves_by_path
from esft_jax.train.memory_plan import DoesNotFit, abstract_params, plan_train_step
from esft_jax.train.trainer import TrainConfig, train
from tests.conftest import REPO
from tests.hf_models import ARCHITECTURES, save_hf_model_dir
from tests.replay import replay

EXPERTS = {"1": [0, 1], "2": [3], "3": [2, 5, 7]}  # tiny-deepseek: MoE layers 1-3


def _plan_cli(tmp_path, *flags):
  """`esft-jax train --plan` on tiny-deepseek, ESFT, over 4 simulated CPU devices (fsdp=4) in a process of its own:
  the device count is fixed before JAX starts. Returns (exit code, output, {row: MiB})."""
  expert_config = tmp_path / "experts.json"
  expert_config.write_text(json.dumps({"experts": EXPERTS, "shared_experts": False, "non_expert_modules": False}))
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  done = subprocess.run([sys.executable, "-m", "esft_jax", "train", "--plan", "--model", "tiny-deepseek", "--method",
                         "esft", "--expert-config", str(expert_config), "--mesh", "fsdp=4", "--batch-size", "4",
                         "--seq-length", "64", "--grad-accum", "2", *flags],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  rows = {name.strip(): float(value) for name, value in re.findall(r"^\| ([^|]+) \| ([\d.]+) \|$", done.stdout, re.M)}
  return done.returncode, done.stdout + done.stderr, rows


def test_plan_on_simulated_devices_prints_each_part_and_what_would_fit(tmp_path):
  code, out, rows = _plan_cli(tmp_path, "--device-memory-gib", "0.01")  # 10 MiB: the weights fit, the step not
  assert code == 1, out
  assert "mesh data=1,fsdp=4,expert=1,tensor=1" in out and "| what | MiB |" in out, out
  config = load_config("tiny-deepseek")
  trained = sum(len(ids) for ids in EXPERTS.values()) * 3 * config.hidden_size * config.moe_intermediate_size
  per_device_mib = trained * 4 / 4 / 2**20  # fp32, split 4 ways on the experts' width
  assert rows["trainable weights (fp32)"] == round(per_device_mib, 2)
  assert rows["optimizer state"] == round(2 * per_device_mib, 2)  # Adam's two moments, fp32
  assert rows["of which gradients (fp32), at least"] == round(per_device_mib, 2)
  whole = tree_bytes(jax.eval_shape(lambda: init_params(config, jax.random.key(0), param_dtype=jnp.bfloat16)))
  assert 0.95 * whole / 4 / 2**20 < rows["frozen weights"] <= whole / 2**20  # mostly split; norms are whole
  assert rows["temporaries (XLA)"] > rows["of which gradients (fp32), at least"]
  parts = ("frozen weights", "trainable weights (fp32)", "optimizer state", "batch and other outputs",
           "temporaries (XLA)")
  assert abs(rows["total"] - sum(rows[p] for p in parts)) <= 0.03
  assert f"device memory: 10.24 MiB; does NOT fit: {rows['total'] - 10.24:.2f} MiB over" in out, out
  assert "--remat" in out and "--batch-size 2 --grad-accum 4" in out and "--mesh fsdp=8" in out, out


def _tiny():
  config = config_from_hf(ARCHITECTURES["deepseek_v2"]().to_dict())
  return config, plan_from_expert_config({"experts": {"1": [3, 0], "2": [5]}})


def _batches(config, n, b=2, length=12):
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, config.vocab_size, size=(n, b, length + 1))
  return [{"inputs": t[:, :-1].astype(np.int32), "targets": t[:, 1:].astype(np.int32),
           "loss_mask": np.ones((b, length), np.float32), "segment_ids": np.ones((b, length), np.int32),
           "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy()} for t in tokens]


def test_abstract_plan_equals_the_step_a_run_compiles(tmp_path):
  """The plan compiles from shapes alone; the run compiles from arrays: the same program, the same bytes."""
  config, plan = _tiny()
  cfg = TrainConfig(steps=1, grad_accum=1, compute_dtype="float32", eval_every=10, save_every=10)
  memory = plan_train_step(config, plan, cfg, sharding.single_device_mesh(), 2, 12, param_dtype="float32")
  params = init_params(config, jax.random.key(0))
  stream, _, _ = replay(_batches(config, 1))
  result = train(config, params, plan, stream, [], tmp_path, cfg)
  assert memory.total == result.step_peak_bytes
  assert memory.frozen == tree_bytes(params)
  trained = 3 * 3 * config.hidden_size * config.moe_intermediate_size
  assert memory.trainable == memory.gradients == 4 * trained
  assert 8 * trained <= memory.optimizer <= 8 * trained + 64  # two fp32 moments and step counters


def test_a_run_that_does_not_fit_stops_before_its_first_step(tmp_path):
  config, plan = _tiny()
  # 1 MiB: the weights fit, the step does not
  cfg = TrainConfig(steps=2, grad_accum=1, compute_dtype="float32", log_every=1, device_memory_gib=1 / 1024)
  stream, _, _ = replay(_batches(config, 1))
  with pytest.raises(DoesNotFit) as failure:
    train(config, init_params(config, jax.random.key(0)), plan, stream, [], tmp_path, cfg)
  message = str(failure.value)
  assert "does NOT fit" in message and "| temporaries (XLA) |" in message and "--remat" in message, message
  assert "--batch-size 1 --grad-accum 2" in message, message
  assert not (tmp_path / "metrics.jsonl").exists() or "loss" not in (tmp_path / "metrics.jsonl").read_text()
  assert not list((tmp_path / "checkpoints").glob("[0-9]*"))


def test_abstract_parameters_are_what_the_checkpoint_loader_returns(tmp_path):
  """The plan's parameters have the dtypes, shapes and shardings of `load_hf_model(dir, bf16, shardings)`, the
  real run's path (the router in fp32)."""
  save_hf_model_dir("deepseek_v2", tmp_path)
  mesh = sharding.single_device_mesh()
  config = load_config(tmp_path)
  loaded = leaves_by_path(load_hf_model(tmp_path, jnp.bfloat16, sharding.param_shardings(config, mesh)).params)
  planned = leaves_by_path(abstract_params(config, mesh, jnp.bfloat16))
  assert loaded.keys() == planned.keys()
  for path, leaf in planned.items():
    assert (leaf.shape, leaf.dtype, leaf.sharding) == (loaded[path].shape, loaded[path].dtype,
                                                       loaded[path].sharding), path
  assert {str(leaf.dtype) for path, leaf in planned.items() if "/mlp/gate/" in path} == {"float32"}


def test_trained_rows_gradient_is_made_apart_from_its_readers():
  """The rows' gradient is gathered behind an optimization barrier, so XLA cannot fuse the gather into the
  optimizer's update and hold every layer's stack-sized gradient until it runs (see `rows_already_in`)."""
  from esft_jax.model.experts import rows_already_in

  stack, rows, ids = jnp.ones((6, 4, 3)), jnp.full((2, 4, 3), 2.0), jnp.array([4, 1])
  grad = jax.grad(lambda r: jnp.sum(rows_already_in(stack, r, ids) * jnp.arange(6.0)[:, None, None]))
  assert "optimization_barrier" in str(jax.make_jaxpr(grad)(rows))
  np.testing.assert_array_equal(grad(rows), np.broadcast_to(np.array([4.0, 1.0])[:, None, None], (2, 4, 3)))
