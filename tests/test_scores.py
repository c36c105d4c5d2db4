"""Routing statistics: the official summary.json from the official logs, the accumulator (with and without jit)
against a plain loop, the scoring pass traced once per bucketed length, the log writer round trip, and errors on
malformed logs."""

from __future__ import annotations

import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esft_jax.config import load_config
from esft_jax.data.formatting import Example
from esft_jax.esft import routing_pass
from esft_jax.esft.scores import (RoutingTotals, accumulate, read_routing_logs, summary_from_logs,
                                  summary_from_totals, write_routing_logs, write_summary)
from esft_jax.model.moe import Routing
from esft_jax.model.transformer import init_params

E, K = 8, 3


@pytest.fixture(scope="module")
def intent(esft_reference):
  return esft_reference / "intent"


def test_summary_from_official_logs_is_exact(intent, tmp_path):
  summary = summary_from_logs(intent / "routing_logs")
  reference = json.loads((intent / "summary.json").read_text())
  assert summary == reference  # every value of both tables, layers 1..26 and experts 0..63
  write_summary(tmp_path / "summary.json", summary)
  assert (tmp_path / "summary.json").read_bytes() == (intent / "summary.json").read_bytes()
  assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_official_logs_totals(intent):
  totals, layer_ids, top_k = read_routing_logs(intent / "routing_logs")
  assert layer_ids == list(range(1, 27)) and top_k == 6 and totals.n_tokens == 8222  # the release's intent logs
  np.testing.assert_array_equal(totals.token_counts.sum(axis=1), 6 * 8222)
  gate_mass = totals.gate_sums.sum(axis=1) / 8222
  assert np.all((gate_mass > 0.33) & (gate_mass < 0.48))  # the mean top-6 mass, not renormalised


def _random_routing(seed, n_layers, b, length):
  rng = np.random.default_rng(seed)
  routing = []
  for _ in range(n_layers):
    ids = np.stack([rng.permutation(E)[:K] for _ in range(b * length)]).reshape(b, length, K)
    weights = rng.random((b, length, K)).astype(np.float32) / K
    routing.append(Routing(jnp.asarray(ids, jnp.int32), jnp.asarray(weights), jnp.zeros((b, length, E))))
  return tuple(routing)


def _loop_totals(routings, masks):
  """The obviously-correct twin: token by token."""
  counts, gates, n = np.zeros((len(routings[0]), E)), np.zeros((len(routings[0]), E)), 0
  for routing, mask in zip(routings, masks):
    for bi, li in zip(*np.nonzero(mask)):
      n += 1
      for layer, r in enumerate(routing):
        for e, w in zip(np.asarray(r.expert_ids)[bi, li], np.asarray(r.weights)[bi, li]):
          counts[layer, e] += 1
          gates[layer, e] += w
  return counts, gates, n


class AccumulateTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_loop_and_skips_padding(self):
    step = self.variant(accumulate)
    routings = [_random_routing(seed, n_layers=2, b=3, length=5) for seed in range(2)]
    masks = [np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]]),  # right padding, an empty row
             np.array([[1, 1, 2, 2, 0], [3, 3, 3, 3, 3], [1, 0, 0, 0, 0]])]  # packed segment ids
    totals = RoutingTotals.zeros(2, E)
    for routing, mask in zip(routings, masks):
      totals = step(totals, routing, jnp.asarray(mask))
    counts, gates, n = _loop_totals(routings, masks)
    chex.assert_trees_all_equal(totals.token_counts, counts.astype(np.float32))  # whole numbers in fp32: exact
    chex.assert_trees_all_close(totals.gate_sums, gates, rtol=1e-6)  # sums of 17 fp32 weights below 1/3
    assert int(totals.n_tokens) == n == 7 + 10


def test_accumulate_rejects_a_mask_of_another_shape():
  with pytest.raises(AssertionError, match=r"routing of MoE layer 0"):
    accumulate(RoutingTotals.zeros(2, E), _random_routing(0, 2, 2, 3), jnp.ones((3, 2)))


def test_scoring_pass_traces_once_per_bucketed_length(monkeypatch):
  """The totals the scoring step returns go back in as its next argument: a change in their type or placement
  would trace (and compile) the step again for every batch. Rows of 3 to 30 tokens pad to 16 or 32: two traces."""
  cfg = load_config("tiny-deepseek")
  params = init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  lengths = [5, 9, 14, 20, 3, 30, 17, 8]
  examples = [Example(rng.integers(3, cfg.vocab_size, n).astype(np.int32), np.ones(n, bool), "t") for n in lengths]
  chex.clear_trace_counter()
  monkeypatch.setattr(routing_pass, "make_scoring_step",
                      functools.partial(routing_pass.make_scoring_step, max_traces=2))
  summary = routing_pass.score_examples(cfg, params, examples, batch_size=2)
  assert set(summary) == {"token_scores", "gate_scores"}
  chex.clear_trace_counter()
  monkeypatch.setattr(routing_pass, "make_scoring_step",
                      functools.partial(routing_pass.make_scoring_step.func, max_traces=1))
  with pytest.raises(AssertionError, match="traced > 1 times"):
    routing_pass.score_examples(cfg, params, examples, batch_size=2)


def test_accumulate_rejects_wrong_layer_count():
  with pytest.raises(ValueError, match="3 MoE layers but the totals have 2 rows"):
    accumulate(RoutingTotals.zeros(2, E), _random_routing(0, 3, 1, 2), jnp.ones((1, 2)))


def test_summary_from_totals_schema():
  totals = RoutingTotals(np.array([[3.0, 1.0, 2.0, 0.0]]), np.array([[0.9, 0.1, 0.3, 0.0]]), 3)
  summary = summary_from_totals(totals, top_k=2, layer_ids=[5])
  assert summary == {"token_scores": {"5": {"0": 0.5, "1": 0.1667, "2": 0.3333, "3": 0.0}},
                     "gate_scores": {"5": {"0": 0.3, "1": 0.0333, "2": 0.1, "3": 0.0}}}
  with pytest.raises(ValueError, match="no tokens were scored"):
    summary_from_totals(RoutingTotals.zeros(1, 4), top_k=2, layer_ids=[5])


def test_written_logs_read_back_to_the_same_summary(tmp_path):
  rng = np.random.default_rng(0)
  layer_ids = [1, 2, 4]
  samples = []
  for length in (4, 7, 1):
    per_layer = []
    for _ in layer_ids:
      ids = np.stack([rng.permutation(E)[:K] for _ in range(length)])
      weights = rng.integers(0, 6, (length, K)) / 16  # exact in fp32 and at 4 decimals
      per_layer.append((ids, weights))
    samples.append(per_layer)
  write_routing_logs(tmp_path, layer_ids, samples)
  assert sorted(p.name for p in tmp_path.iterdir()) == [f"expert_weights_{i}.txt" for i in layer_ids]
  first = (tmp_path / "expert_weights_1.txt").read_text().splitlines()[0]
  assert first.count("\t\t") == 1 and len(first.split("\t\t")[0].split("\t")) == 4 * K

  totals, read_layers, top_k = read_routing_logs(tmp_path, top_k=K, num_experts=E)
  assert read_layers == layer_ids and top_k == K and totals.n_tokens == 12
  # The same routing through the jitted accumulator, one padded batch.
  batch_ids, batch_w = np.zeros((3, len(layer_ids), 7, K), np.int32), np.zeros((3, len(layer_ids), 7, K))
  mask = np.zeros((3, 7), np.int32)
  for s, per_layer in enumerate(samples):
    for j, (ids, weights) in enumerate(per_layer):
      batch_ids[s, j, :len(ids)], batch_w[s, j, :len(ids)] = ids, weights
    mask[s, :len(per_layer[0][0])] = 1
  routing = tuple(Routing(jnp.asarray(batch_ids[:, j]), jnp.asarray(batch_w[:, j], jnp.float32), None)
                  for j in range(len(layer_ids)))
  device = jax.jit(accumulate)(RoutingTotals.zeros(len(layer_ids), E), routing, jnp.asarray(mask))
  assert summary_from_logs(tmp_path, top_k=K, num_experts=E) == summary_from_totals(device, K, layer_ids)


def test_writer_rounds_weights_to_four_decimals(tmp_path):
  write_routing_logs(tmp_path, [3], [[(np.array([[2, 0]]), np.array([[0.123456, 0.0470001]], np.float32))]])
  assert (tmp_path / "expert_weights_3.txt").read_text() == "2\t0\t\t0.1235\t0.047\n"


def test_writer_rejects_mismatched_shapes(tmp_path):
  with pytest.raises(ValueError, match="sample 0, layer 3: ids"):
    write_routing_logs(tmp_path / "logs", [3], [[(np.zeros((2, 2), int), np.zeros((2, 3)))]])
  with pytest.raises(ValueError, match="sample 0 has routing for 1 layers, expected 2"):
    write_routing_logs(tmp_path / "logs", [3, 4], [[(np.zeros((2, 2), int), np.zeros((2, 2)))]])
  assert not (tmp_path / "logs").exists()


def test_logs_in_rank_folders_are_pooled(tmp_path):
  write_routing_logs(tmp_path / "rank_0", [1], [[(np.array([[0, 1]]), np.array([[0.5, 0.25]]))]])
  write_routing_logs(tmp_path / "rank_1", [1], [[(np.array([[1, 2], [3, 0]]), np.array([[0.5, 0.25]] * 2))]])
  totals, _, _ = read_routing_logs(tmp_path, top_k=2, num_experts=4)
  np.testing.assert_array_equal(totals.token_counts, [[2, 2, 1, 1]])
  np.testing.assert_array_equal(totals.gate_sums, [[0.75, 0.75, 0.25, 0.5]])
  assert totals.n_tokens == 3


@pytest.mark.parametrize("line,message", [
    ("1\t2\t0.5\t0.5\n", r"expert_weights_1.txt:2: expected tab-separated expert ids, a tab pair"),
    ("1\t2\t\t0.5\n", r"expert_weights_1.txt:2: 2 expert ids but 1 weights"),
    ("1\tx\t\t0.5\t0.5\n", r"expert_weights_1.txt:2: expert id 'x' is not a number"),
    ("1\t2\t\t0.5\t0,5\n", r"expert_weights_1.txt:2: weight '0,5' is not a number"),
    ("1\t2\t\t0.5\tnan\n", r"expert_weights_1.txt:2: weight 'nan' is not finite"),
    ("1\t-2\t\t0.5\t0.5\n", r"expert_weights_1.txt:2: expert id -2 is negative"),
    ("\n", r"expert_weights_1.txt:2: expected"),
    ("1\t2\t3\t\t0.5\t0.5\t0.5\n", r"expert_weights_1.txt:2: 3 expert ids is not a multiple of top_k=2"),
])
def test_malformed_log_names_file_and_line(tmp_path, line, message):
  (tmp_path / "expert_weights_1.txt").write_text("0\t1\t\t0.5\t0.25\n" + line)
  with pytest.raises(ValueError, match=message):
    read_routing_logs(tmp_path, top_k=2)


def test_log_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no expert_weights_\\*.txt routing logs"):
    read_routing_logs(tmp_path)
  (tmp_path / "expert_weights_x.txt").write_text("0\t\t0.5\n")
  with pytest.raises(ValueError, match="expert_weights_x.txt: routing log names must be"):
    read_routing_logs(tmp_path)
  (tmp_path / "expert_weights_x.txt").unlink()
  (tmp_path / "expert_weights_1.txt").write_text("")
  with pytest.raises(ValueError, match="expert_weights_1.txt: empty routing log"):
    read_routing_logs(tmp_path)
  (tmp_path / "expert_weights_1.txt").write_text("0\t1\t\t0.5\t0.25\n")
  (tmp_path / "expert_weights_2.txt").write_text("0\t1\t2\t3\t\t0.5\t0.25\t0.5\t0.25\n")
  with pytest.raises(ValueError, match="layers logged different numbers of tokens"):
    read_routing_logs(tmp_path, top_k=2)
  with pytest.raises(ValueError, match="expert_weights_2.txt:1: expert id 3 is out of range for num_experts=3"):
    read_routing_logs(tmp_path, top_k=2, num_experts=3)
