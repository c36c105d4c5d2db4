"""Exports the ESFT train step, the scoring pass and generation of tiny DeepSeek-V2 and DeepSeek-V3 models for
platform "tpu" from a CPU, over 8 simulated devices (fsdp=4 x expert=2), with the TPU expert path; abstract
arguments only, nothing allocated or compiled. Prints one JSON object: per model and program, the platforms,
device count and number of Mosaic TPU kernel calls of what it exported.

tests/test_tpu.py runs this file in a subprocess, because the device count must be fixed before JAX starts.

    python -m tests.tpu_lowering
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from esft_jax import sharding  # noqa: E402
from esft_jax.config import config_from_hf, load_config  # noqa: E402
from esft_jax.esft.routing_pass import make_scoring_step  # noqa: E402
from esft_jax.esft.scores import RoutingTotals  # noqa: E402
from esft_jax.esft.trainable import init_trainable, plan_from_expert_config  # noqa: E402
from esft_jax.generate import _decode_chunk, _prefill  # noqa: E402
from esft_jax.model.transformer import Transformer, init_cache, init_params  # noqa: E402
from esft_jax.train.optimizer import learning_rate_schedule, make_optimizer  # noqa: E402
from esft_jax.train.trainer import _init_state, make_train_step, step_shardings  # noqa: E402

MESH = {"fsdp": 4, "expert": 2}
MICRO_BATCHES, BATCH, LENGTH = 2, 8, 16
EXPERT_IMPL = "tpu"  # what "auto" picks on a TPU; here the backend is the CPU, so it is named
# Divisible by the mesh everywhere the rules table splits; the V3 features: q_lora, groups, sigmoid scoring with
# the correction bias, norm_topk_prob, a shared expert.
TINY_V3 = {
    "model_type": "deepseek_v3", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
    "moe_intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
    "n_shared_experts": 1, "n_routed_experts": 8, "num_experts_per_tok": 3, "first_k_dense_replace": 1,
    "n_group": 4, "topk_group": 2, "norm_topk_prob": True, "routed_scaling_factor": 2.5, "kv_lora_rank": 16,
    "q_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "aux_loss_alpha": 0.001,
    "bos_token_id": 0, "eos_token_id": 1,
}
PLAN = plan_from_expert_config({"experts": {"1": [3, 0, 6], "2": [5]}, "shared_experts": False})


def _abstract(tree, shardings=None):
  """ShapeDtypeStructs of `tree`, placed where `shardings` says."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _exported(fn, *args) -> dict:
  exported = jax.export.export(fn, platforms=("tpu",))(*args)
  return {"platforms": list(exported.platforms), "devices": exported.nr_devices,
          "tpu_kernels": exported.mlir_module().count("tpu_custom_call")}


def train_step(cfg, mesh) -> dict:
  """`esft-jax train --method esft`'s step, bf16 compute, two micro-batches."""
  params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  model = Transformer(cfg, expert_impl=EXPERT_IMPL, dtype=jnp.bfloat16, max_segments=1,
                      trained_experts=PLAN.trained_experts, mesh=mesh)
  schedule = learning_rate_schedule(1e-5, 100)
  trainable = jax.eval_shape(lambda p: init_trainable(PLAN, p, jax.random.key(0)), params)
  optimizer = make_optimizer(trainable, schedule)
  init = _init_state(PLAN, optimizer, 0)
  frozen, stacks = PLAN.experts.split(params)
  state = jax.eval_shape(init, frozen, stacks)
  shardings = step_shardings(cfg, PLAN, mesh, state)
  step = make_train_step(model, PLAN, optimizer, schedule, shardings)
  tokens = jax.ShapeDtypeStruct((MICRO_BATCHES, BATCH, LENGTH), jnp.int32)
  batch = {"inputs": tokens, "targets": tokens, "segment_ids": tokens, "positions": tokens,
           "loss_mask": jax.ShapeDtypeStruct(tokens.shape, jnp.float32)}
  return _exported(step, state, frozen, batch)


def scoring(cfg, mesh) -> dict:
  step = make_scoring_step(cfg, EXPERT_IMPL, jnp.bfloat16, mesh=mesh)
  params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  totals = _abstract(RoutingTotals.zeros(len(cfg.moe_layer_ids), cfg.num_experts))
  tokens = jax.ShapeDtypeStruct((BATCH, LENGTH), jnp.int32)
  return _exported(step, params, totals, tokens, tokens)


def generation(cfg, mesh) -> dict:
  """The prefill and a chunk of 4 decoding steps, the parameters split as training splits them, rows over the
  batch axes, the model on the mesh and traced under its rules as training and scoring are (the routed experts
  then run in a shard_map: XLA cannot partition a Mosaic kernel, and without it lowering fails)."""
  model = Transformer(cfg, expert_impl=EXPERT_IMPL, dtype=jnp.bfloat16, mesh=mesh)
  params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  params = _abstract(params, sharding.param_shardings(cfg, mesh))
  rows = sharding.batch_sharding(mesh)
  cache = jax.eval_shape(lambda: init_cache(cfg, BATCH, 2 * LENGTH, jnp.bfloat16))
  tokens = jax.ShapeDtypeStruct((BATCH, LENGTH), jnp.int32, sharding=rows)
  key = jax.eval_shape(lambda: jax.random.key(0))
  token = jax.ShapeDtypeStruct((BATCH,), jnp.int32, sharding=rows)
  with sharding.logical_rules(mesh):
    prefill = _exported(_prefill, model, params, cache, tokens, tokens, tokens, key, 0.0, 1.0)
    decode = _exported(_decode_chunk, model, params, cache, token, token, key, 4, 0.0, 1.0)
  return {"prefill": prefill, "decode": decode}


def main() -> None:
  mesh = sharding.make_mesh(MESH)
  models = {"deepseek_v2": load_config("tiny-deepseek"), "deepseek_v3": config_from_hf(TINY_V3)}
  found = {}
  for name, cfg in models.items():
    found[name] = {"train_step": train_step(cfg, mesh), "scoring": scoring(cfg, mesh), **generation(cfg, mesh)}
  print(json.dumps(found))


if __name__ == "__main__":
  main()
