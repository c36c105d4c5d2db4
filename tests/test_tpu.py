"""The TPU expert path (megablox grouped matmuls) against the reference in Pallas' TPU interpreter: values and
gradients, skewed and empty groups, ESFT's trained experts alone getting weight gradients, one device's slice of
the experts; "auto" choosing it on a TPU; the ESFT step, scoring and generation exported for a TPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esft_jax.model import experts as experts_module
from esft_jax.model.experts import expert_ffn
from esft_jax.model.kernels.megablox import megablox_matmul, tpu_expert_ffn
from tests.test_kernels import moe_inputs, rel_err, routing

REPO = Path(__file__).resolve().parents[1]


def _float32(tree):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def test_megablox_matmul_and_gradients_match_ragged_dot():
  """Rows not a multiple of the row tile, an empty group, a one-row group, rows past the last group; contraction
  and output widths of two tiles, the last one partial."""
  rng = np.random.default_rng(0)
  sizes = jnp.asarray([60, 0, 1, 70, 9], jnp.int32)  # 140 rows in groups, 150 in all
  lhs = jnp.asarray(rng.standard_normal((150, 136)), jnp.float32)
  rhs = jnp.asarray(rng.standard_normal((5, 136, 160)), jnp.float32)
  cotangent = jnp.asarray(rng.standard_normal((150, 160)), jnp.float32)
  in_groups = (jnp.arange(150) < 140)[:, None]

  def loss(matmul):
    return lambda a, b: jnp.sum(jnp.where(in_groups, matmul(a, b, sizes), 0) * cotangent)

  megablox = lambda a, b, g: megablox_matmul(a, b, g, interpret=True)
  got = jax.jit(megablox)(lhs, rhs, sizes)
  np.testing.assert_allclose(got[:140], jax.lax.ragged_dot(lhs, rhs, sizes)[:140], rtol=1e-5, atol=1e-4)
  assert np.all(np.asarray(got[140:]) == 0)
  grads = jax.jit(jax.grad(loss(megablox), argnums=(0, 1)))(lhs, rhs)
  want = jax.grad(loss(jax.lax.ragged_dot), argnums=(0, 1))(lhs, rhs)
  np.testing.assert_allclose(grads[0], want[0], rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(grads[1], want[1], rtol=1e-5, atol=1e-4)
  assert np.all(np.asarray(grads[0][140:]) == 0) and np.all(np.asarray(grads[1][1]) == 0)


@pytest.mark.parametrize("dtype, skewed", [(jnp.float32, False), (jnp.bfloat16, True)], ids=["even-f32", "skewed-bf16"])
def test_tpu_expert_ffn_matches_reference(dtype, skewed):
  rng = np.random.default_rng(4)
  x, ids, weights, experts = moe_inputs(rng, 40, 3, 8, 16, 24, skewed)
  if dtype == jnp.float32:
    x, experts = _float32(x), _float32(experts)
  cotangent = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

  def loss(fn):
    return lambda x_, w_, e_: jnp.sum(fn(x_, ids, w_, e_).astype(jnp.float32) * cotangent)

  tpu = jax.jit(jax.value_and_grad(loss(lambda *a: tpu_expert_ffn(*a, interpret=True)), argnums=(0, 1, 2)))
  reference = jax.value_and_grad(loss(lambda *a: expert_ffn(*a, impl="reference")), argnums=(0, 1, 2))
  (value, grads), (want_value, want) = tpu(x, weights, experts), reference(x, weights, experts)
  tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
  assert abs(float(value) - float(want_value)) < tolerance * abs(float(want_value))
  for got_leaf, want_leaf in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
    assert rel_err(got_leaf, want_leaf) < tolerance
  unused = np.setdiff1d(np.arange(8), np.asarray(ids))
  assert set(unused) >= ({6, 7} if skewed else set()) and (skewed or not len(unused))
  for name in experts:
    assert np.all(np.asarray(grads[2][name][unused]) == 0)


def test_tpu_weight_grads_only_for_trained_experts():
  """ESFT's backward: input and gate-weight gradients as the reference's, the trained experts' weight gradients
  too (an exact zero for trained expert 6, which no token chooses); the frozen experts' are zero, not computed."""
  rng = np.random.default_rng(7)
  x, _, weights, experts = _float32(moe_inputs(rng, 40, 3, 8, 16, 24, skewed=False))
  ids = jnp.asarray(routing(rng, 40, 3, 7, skewed=False))
  ids = jnp.where(ids >= 6, ids + 1, ids)  # 8 experts, and none of the tokens chooses expert 6
  cotangent = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  trained = (1, 5, 6)

  def loss(fn):
    return lambda x_, w_, e_: jnp.sum(fn(x_, ids, w_, e_) * cotangent)

  esft = lambda *a: tpu_expert_ffn(*a, interpret=True, trained_experts=trained)
  grads = jax.jit(jax.grad(loss(esft), argnums=(0, 1, 2)))(x, weights, experts)
  want = jax.grad(loss(lambda *a: expert_ffn(*a, impl="reference")), argnums=(0, 1, 2))(x, weights, experts)
  assert rel_err(grads[0], want[0]) < 1e-5 and rel_err(grads[1], want[1]) < 1e-5
  frozen = [e for e in range(8) if e not in trained]
  for name in experts:
    assert rel_err(grads[2][name][trained,], want[2][name][trained,]) < 1e-5
    assert np.all(np.asarray(grads[2][name][6]) == 0) and np.all(np.asarray(grads[2][name])[frozen] == 0)


def test_tpu_expert_ffn_on_one_devices_experts():
  """Expert parallelism: experts 4-7 of 8 (first_expert traced), the other experts' assignments past the groups;
  the weight gradients of ESFT's trained experts (global ids, one of them on another device)."""
  rng = np.random.default_rng(9)
  x, ids, weights, experts = _float32(moe_inputs(rng, 40, 3, 8, 16, 24, skewed=False))
  local_ids = jnp.where(ids >= 4, ids - 4, 4)  # 4: an expert elsewhere
  half = {name: v[4:] for name, v in experts.items()}
  cotangent = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  trained = (1, 5, 7)

  def esft(x_, w_, e_, first):
    out = tpu_expert_ffn(x_, local_ids, w_, e_, interpret=True, trained_experts=trained, first_expert=first)
    return jnp.sum(out * cotangent)

  def reference(x_, w_, e_):
    return jnp.sum(expert_ffn(x_, ids, w_, e_, impl="reference", first_expert=4) * cotangent)

  value, grads = jax.jit(jax.value_and_grad(esft, argnums=(0, 1, 2)))(x, weights, half, jnp.int32(4))
  want_value, want = jax.value_and_grad(reference, argnums=(0, 1, 2))(x, weights, half)
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  assert rel_err(grads[0], want[0]) < 1e-5 and rel_err(grads[1], want[1]) < 1e-5
  for name in half:
    got, wanted = np.asarray(grads[2][name]), np.asarray(want[2][name])
    assert rel_err(got[[1, 3]], wanted[[1, 3]]) < 1e-5  # global experts 5 and 7
    assert np.all(got[[0, 2]] == 0)


def test_auto_is_tpu_on_a_tpu(monkeypatch):
  monkeypatch.setattr(experts_module, "hopper_available", lambda: False)
  monkeypatch.setattr(experts_module.jax, "default_backend", lambda: "tpu")
  assert experts_module._auto_impl(64, {"gate_proj": jnp.zeros((8, 16, 24))}) == "tpu"


def test_esft_step_scoring_and_generation_lower_for_tpu():
  """Tiny DeepSeek-V2 and V3 programs exported for platform "tpu" over 8 simulated devices (fsdp=4 x expert=2),
  each with the megablox kernels in it as Mosaic TPU calls (tests/tpu_lowering.py); the train step's backward adds
  its own. A program that cannot lower for a TPU fails here. Compiling for a TPU needs one."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  done = subprocess.run([sys.executable, "-m", "tests.tpu_lowering"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-4000:]
  found = json.loads(done.stdout.strip().splitlines()[-1])
  assert set(found) == {"deepseek_v2", "deepseek_v3"}
  for model, programs in found.items():
    assert set(programs) == {"train_step", "scoring", "prefill", "decode"}, model
    for name, program in programs.items():
      assert program["platforms"] == ["tpu"] and program["devices"] == 8, (model, name)
      assert program["tpu_kernels"] > 0, (model, name)
    assert programs["train_step"]["tpu_kernels"] > programs["scoring"]["tpu_kernels"], model


def test_deepseek_v3_preset_counts_and_reads_its_fp8_config():
  """The preset is DeepSeek-V3's config.json: 671B parameters (the multi-token-prediction layer aside), 37B active
  as DeepSeek reports, its FP8 block size read as the loader reads it."""
  from esft_jax.config import load_config, read_hf_config
  from esft_jax.interop import fp8
  from esft_jax.model.transformer import parameter_counts

  cfg = load_config("deepseek-v3")
  counts = parameter_counts(cfg)
  assert round(counts.total / 1e9) == 671 and round(counts.active_per_token / 1e9) == 37
  assert cfg.moe_layer_ids == tuple(range(3, 61)) and cfg.num_experts == 256 and cfg.num_experts_per_tok == 8
  assert (cfg.scoring_func, cfg.topk_method, cfg.n_group, cfg.topk_group) == ("sigmoid", "noaux_tc", 8, 4)
  assert cfg.routed_scaling_factor == 2.5 and cfg.norm_topk_prob and cfg.shared_intermediate_size == 2048

  class NoTensors:
    def keys(self):
      return []

  hf = read_hf_config("deepseek-v3")
  assert fp8.weight_block_size(hf, NoTensors(), "deepseek-v3") == (128, 128)


def test_sizing_tiny_prints_a_table_with_compiled_temporaries():
  """experiments/sizing.py on tiny-deepseek over 8 simulated devices: every column filled, the per-device bytes
  adding up, the temporaries from XLA's compiled steps (the megablox kernels as opaque stand-ins)."""
  done = subprocess.run([sys.executable, str(REPO / "experiments" / "sizing.py"), "--tiny", "--methods", "esft"],
                        cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  header, _, row = [line for line in done.stdout.splitlines() if line.startswith("|")]
  cells = dict(zip([c.strip() for c in header.strip("|").split("|")], [c.strip() for c in row.strip("|").split("|")]))
  assert cells["candidate"] == "tiny x8" and cells["method"] == "esft"
  parts = [float(cells[k]) for k in ("weights", "trainable", "optimizer", "temporaries (est.)")]
  assert all(p > 0 for p in parts)
  assert abs(sum(parts) - float(cells["total (est.)"])) < 0.2
  assert cells["fits: state"] == "yes" and cells["fits: est."] in ("yes", "no")
  assert float(cells["tokens/s (est.)"].replace(",", "")) > 0


@pytest.mark.parametrize("trained, weight_grad_kernels", [(None, 3), ((1, 5, 6), 9), ((), 0)])
def test_tpu_backward_runs_weight_grad_kernels_only_for_trained_experts(trained, weight_grad_kernels):
  """The backward's kernels, counted in its program: per projection a forward gmm and an input-gradient gmm, and
  one tgmm over all experts (None) or one per trained expert, none with no expert trained."""
  x, ids, weights, experts = _float32(moe_inputs(np.random.default_rng(3), 40, 3, 8, 16, 24, skewed=False))
  loss = lambda x_, e_: jnp.sum(tpu_expert_ffn(x_, ids, weights, e_, interpret=True, trained_experts=trained))
  program = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, experts))  # each kernel a call of its jit
  assert program.count("name=gmm") == 3 + 3 and program.count("name=tgmm") == weight_grad_kernels
