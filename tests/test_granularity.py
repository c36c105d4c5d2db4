"""Granularity ablations: the exact greedy grouping, co-occurrence counts, the grouped (coarse) model against
the fine one and against a direct computation, the HF round trip, and the scratch bases' shapes."""

import dataclasses
import itertools
import threading

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esft_jax.ablations.granularity import (cooccurrence, cosine_similarity, greedy_groups, grouped_model,
                                            scratch_spec)
from esft_jax.ablations.runner import pretrain_bases
from esft_jax.config import config_from_hf
from esft_jax.data.formatting import Example
from esft_jax.demo.pretrain import base_is_built, build_base
from esft_jax.interop.hf import load_hf_model, save_hf_model
from esft_jax.model.moe import MoEBlock
from esft_jax.model.transformer import Transformer, init_params
from tests.test_demo import MICRO

SPEC = dataclasses.replace(MICRO.base, experts_per_token=4)  # 8 experts top-4: groups of 1, 2 and 4 fit


@pytest.fixture(scope="module")
def fine():
  hf = SPEC.hf_config()
  config = config_from_hf(hf)
  return config, jax.jit(init_params, static_argnums=0)(config, jax.random.key(0)), hf


def _routing_counts(ids_TxK, e):
  chosen = np.zeros((len(ids_TxK), e))
  chosen[np.arange(len(ids_TxK))[:, None], ids_TxK] = 1
  return chosen.T @ chosen


def test_greedy_grouping_finds_the_experts_routed_together():
  rng = np.random.default_rng(0)
  blocks = [(0, 3, 5, 6), (1, 2, 4, 7)]  # tokens always pick two experts of one block
  ids = np.array([rng.choice(blocks[rng.integers(2)], 2, replace=False) for _ in range(400)])
  similarity = cosine_similarity(_routing_counts(ids, 8))
  assert sorted(greedy_groups(similarity, 4)) == blocks
  # Pairs: the tightest pairs come first; every expert once.
  pairs = np.array([rng.permutation([[0, 7], [1, 6], [2, 5], [3, 4]][rng.integers(4)]) for _ in range(200)])
  assert sorted(greedy_groups(cosine_similarity(_routing_counts(pairs, 8)), 2)) == [(0, 7), (1, 6), (2, 5), (3, 4)]
  assert greedy_groups(similarity, 1) == [(i,) for i in range(8)]


def test_greedy_grouping_is_exhaustive_at_each_step():
  """Against a brute force over every subset at each step, on a random similarity with no structure."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(12, 12))
  similarity = (x + x.T) / 2
  remaining, expected = list(range(12)), []
  while remaining:
    best = max(itertools.combinations(remaining, 3),
               key=lambda s: np.mean([similarity[a, b] for a, b in itertools.combinations(s, 2)]))
    expected.append(best)
    remaining = [i for i in remaining if i not in best]
  assert greedy_groups(similarity, 3) == expected


def test_grouping_errors_name_the_problem(fine):
  config, params, hf = fine
  with pytest.raises(ValueError, match="group size 3 does not divide the 8 experts"):
    greedy_groups(np.eye(8), 3)
  with pytest.raises(ValueError, match="must divide both n_routed_experts=8 and the 4 active experts per token"):
    grouped_model(config, params, hf, {layer: [tuple(range(8))] for layer in config.moe_layer_ids})
  with pytest.raises(ValueError, match="exactly once"):
    grouped_model(config, params, hf, {layer: [(0, 1), (1, 2), (4, 5), (6, 7)] for layer in config.moe_layer_ids})
  with pytest.raises(ValueError, match="router_group_size=0 must be a positive integer"):
    config_from_hf({**hf, "router_group_size": 0})
  with pytest.raises(ValueError, match="needs topk_method 'greedy'"):
    config_from_hf({**hf, "router_group_size": 2, "topk_method": "group_limited_greedy"})


def test_group_size_one_is_the_fine_model(fine):
  """Singleton groups in a shuffled order: a permuted but identical model."""
  config, params, hf = fine
  rng = np.random.default_rng(2)
  groups = {layer: [(int(i),) for i in rng.permutation(8)] for layer in config.moe_layer_ids}
  coarse_config, coarse_params, _ = grouped_model(config, params, hf, groups)
  assert coarse_config == config
  tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, 12)), jnp.int32)
  want = jax.jit(Transformer(config).apply)({"params": params}, tokens)
  got = jax.jit(Transformer(coarse_config).apply)({"params": coarse_params}, tokens)
  np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5)
  for r_want, r_got, layer in zip(want.routing, got.routing, config.moe_layer_ids):
    order = np.array([g[0] for g in groups[layer]])
    np.testing.assert_array_equal(order[np.asarray(r_got.expert_ids)], np.asarray(r_want.expert_ids))


def _swiglu(x, gate, up, down):
  return (jax.nn.silu(x @ gate) * (x @ up)) @ down


@pytest.mark.parametrize("size, active", [(2, 4), (4, 4), (2, 2), (1, 6)])
def test_grouped_layer_equals_the_direct_computation(fine, size, active):
  """Sum over the top-(A/G) groups of (mean member probability) × (sum of the members' FFNs), plus shared; A is the
  fine model's top-4 or another count of active experts."""
  config, params, hf = fine
  rng = np.random.default_rng(size)
  groups = {layer: [tuple(int(i) for i in g) for g in rng.permutation(8).reshape(-1, size)]
            for layer in config.moe_layer_ids}
  coarse_config, coarse_params, coarse_hf = grouped_model(config, params, hf, groups, active)
  assert (coarse_config.num_experts, coarse_config.num_experts_per_tok) == (8 // size, active // size)
  assert coarse_config.moe_intermediate_size == size * config.moe_intermediate_size
  assert coarse_config.shared_intermediate_size == config.shared_intermediate_size
  assert coarse_hf["router_group_size"] == size
  layer = config.moe_layer_ids[0]
  fine_mlp = params[f"layers_{layer}"]["mlp"]
  x = jnp.asarray(rng.normal(size=(3, 5, config.hidden_size)), jnp.float32)
  out, routing = MoEBlock(coarse_config).apply({"params": coarse_params[f"layers_{layer}"]["mlp"]}, x)

  x_TxD = np.asarray(x.reshape(-1, config.hidden_size), np.float64)
  probs_TxE = jax.nn.softmax(x_TxD @ np.asarray(fine_mlp["gate"]["kernel"]), axis=-1)
  experts = {k: np.asarray(v, np.float64) for k, v in fine_mlp["experts"].items()}
  shared = {k: np.asarray(v["kernel"], np.float64) for k, v in fine_mlp["shared_experts"].items()}
  want = np.zeros_like(x_TxD)
  for t in range(len(x_TxD)):
    affinity = [np.mean([probs_TxE[t, i] for i in g]) for g in groups[layer]]
    for j in np.argsort(affinity)[::-1][:active // size]:
      want[t] += affinity[j] * sum(_swiglu(x_TxD[t], experts["gate_proj"][i], experts["up_proj"][i],
                                           experts["down_proj"][i]) for i in groups[layer][j])
    want[t] += _swiglu(x_TxD[t], shared["gate_proj"], shared["up_proj"], shared["down_proj"])
  np.testing.assert_allclose(np.asarray(out).reshape(want.shape), want, rtol=1e-4, atol=1e-5)
  assert routing.probs.shape == (3, 5, 8 // size)


def test_grouped_model_round_trips_through_hf(fine, tmp_path):
  config, params, hf = fine
  groups = {layer: [(0, 5), (1, 2), (3, 7), (4, 6)] for layer in config.moe_layer_ids}
  coarse_config, coarse_params, coarse_hf = grouped_model(config, params, hf, groups)
  save_hf_model(tmp_path, coarse_config, coarse_params, coarse_hf)
  loaded = load_hf_model(tmp_path)
  assert loaded.config == coarse_config and loaded.config.router_group_size == 2
  chex.assert_trees_all_equal(loaded.params, coarse_params)


def test_cooccurrence_counts_real_tokens_only(fine):
  config, params, _ = fine
  rng = np.random.default_rng(3)
  examples = [Example(rng.integers(3, config.vocab_size, n).astype(np.int32), np.ones(n, bool), str(n))
              for n in (5, 9, 17)]
  counts = cooccurrence(config, params, examples, batch_size=2)
  n_tokens = sum(len(e) for e in examples)
  k = config.num_experts_per_tok
  assert counts.shape == (len(config.moe_layer_ids), 8, 8)
  np.testing.assert_array_equal(counts.sum(axis=(1, 2)), n_tokens * k * k)  # K² pairs (i, j) per token
  np.testing.assert_array_equal(np.trace(counts, axis1=1, axis2=2), n_tokens * k)


def test_scratch_specs_keep_total_and_active_routed_width():
  base = MICRO.base  # 8 experts of width 16, top-2
  for experts, k, width in ((4, 1, 32), (8, 2, 16), (16, 4, 8)):
    spec = scratch_spec(base, experts, 32)
    assert (spec.routed_experts, spec.experts_per_token, spec.expert_width) == (experts, k, width)
    assert spec.shared_experts * spec.expert_width == 32 and spec.steps == base.steps
  assert scratch_spec(base, 4, 0).shared_experts == 0
  with pytest.raises(ValueError, match="do not split evenly into 3 experts"):
    scratch_spec(base, 3, 0)
  with pytest.raises(ValueError, match="shared_width=16 is not a multiple of the expert width 32"):
    scratch_spec(base, 4, 16)


def test_bases_pretrained_in_workers_or_by_two_callers_at_once_are_the_same(tmp_path):
  """The granularity-from-scratch bases, pretrained two at a time in spawned workers, are those `build_base`
  pretrains in this process (same tokenizer, same weights). Two callers of `build_base` on one spec at once (two
  ablations sharing a cache): one pretrains, the other waits for it and reuses the result."""
  specs = [scratch_spec(MICRO.base, 4, 0), scratch_spec(MICRO.base, 16, 0)]
  lines = []
  pretrain_bases(specs + specs[:1], tmp_path / "workers", 2, lines.append)
  assert lines[0] == "pretraining 2 bases, 2 at a time" and len(lines) == 3
  assert all(base_is_built(spec, tmp_path / "workers") for spec in specs)

  started, lines = threading.Event(), []

  def first_log(line: str) -> None:
    lines.append(("first", line))
    if line.startswith("pretraining the base model"):
      started.set()

  first = threading.Thread(target=build_base, args=(specs[0], tmp_path / "here", first_log))
  first.start()
  assert started.wait(120)
  here, _ = build_base(specs[0], tmp_path / "here", lambda line: lines.append(("second", line)))
  first.join()
  assert [who for who, line in lines if line.startswith("pretraining the base model")] == ["first"]
  assert ("second", f"reusing {here}") in lines

  there = tmp_path / "workers" / here.name
  assert (there / "tokenizer.json").read_text() == (here / "tokenizer.json").read_text()
  want, got = load_hf_model(here), load_hf_model(there)
  chex.assert_trees_all_equal(got.params, want.params)
