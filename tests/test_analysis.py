"""Routing analyses and figures: concentration and overlap on hand-made routing with known answers (ties to the
lower id, even/odd split), the jitted per-sample gate sums against a plain loop, the official intent logs
against their overlap and concentration computed independently, and the PNG files without a display."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esft_jax.analysis import figures, routing
from esft_jax.esft.scores import RoutingTotals, accumulate, write_routing_logs
from esft_jax.model.moe import Routing

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_concentration_by_hand():
  gate_sums_NxE = np.array([[3.0, 1.0, 0.0, 0.0],  # shares 0.75, 0.25, 0, 0
                            [0.0, 2.0, 2.0, 0.0]])  # shares 0.5, 0.5, 0, 0
  np.testing.assert_allclose(routing.concentration(gate_sums_NxE), [0.625, 0.375, 0, 0])
  np.testing.assert_allclose(routing.concentration_spread(gate_sums_NxE), [0.125, 0.125, 0, 0])
  with pytest.raises(ValueError, match="no gate mass"):
    routing.concentration(np.array([[1.0, 0.0], [0.0, 0.0]]))


def test_overlap_ties_to_lower_id_and_splits_even_odd():
  # [layers=2, samples=2, experts=4]; top-2. Task A's odd sample and task B's even one must not count.
  a = np.array([[[1, 1, 1, 0], [0, 0, 5, 5]],  # even: ties -> {0, 1}
                [[0, 0, 2, 1], [9, 9, 0, 0]]], float)  # even: {2, 3}
  b = np.array([[[9, 9, 0, 0], [0, 1, 1, 1]],  # odd: ties -> {1, 2}
                [[5, 5, 0, 0], [0, 0, 1, 1]]], float)  # odd: {2, 3}
  np.testing.assert_array_equal(routing.top_experts([1, 1, 1, 0], 2), [0, 1])
  assert routing.overlap(a, b, k=2) == (1 + 2) / 2
  assert routing.overlap(a, a, k=2) == (0 + 0) / 2  # A's even {0,1},{2,3} vs A's odd {2,3},{0,1}
  assert routing.overlap(b, a, k=2) == (0 + 2) / 2  # B's even {0,1},{0,1} vs A's odd {2,3},{0,1}
  with pytest.raises(ValueError, match="samples >= 2"):
    routing.overlap(a[:, :1], b, k=2)


def test_routing_figures_dict_and_json(tmp_path):
  a = np.array([[[1, 1, 1, 0], [0, 0, 5, 5]], [[0, 0, 2, 1], [9, 9, 0, 0]]], float)
  b = np.array([[[9, 9, 0, 0], [0, 1, 1, 1]], [[5, 5, 0, 0], [0, 0, 1, 1]]], float)
  result = routing.routing_figures({"a": a, "b": b}, top_k=2, out_dir=tmp_path, layer_ids=[1, 2])
  assert result["overlap"]["a"]["b"] == 1.5 and result["layers"] == [1, 2] and result["samples"] == {"a": 2, "b": 2}
  np.testing.assert_allclose(result["concentration"]["a"], routing.concentration(a.sum(axis=1)))
  assert json.loads((tmp_path / routing.FIGURES_JSON).read_text()) == result
  assert sorted(p.name for p in tmp_path.iterdir()) == [routing.FIGURES_JSON]
  with pytest.raises(ValueError, match="different layers or experts"):
    routing.routing_figures({"a": a, "b": b[:1]}, top_k=2)


@pytest.mark.parametrize("jit", [False, True])
def test_sample_gate_sums_matches_a_loop_and_the_totals(jit):
  b, l, k, e = 3, 5, 2, 6
  rng = np.random.default_rng(0)
  ids_BxLxK = np.stack([np.stack([rng.choice(e, k, replace=False) for _ in range(l)]) for _ in range(b)])
  routings = [Routing(jnp.asarray(ids_BxLxK, jnp.int32), jnp.asarray(rng.random((b, l, k)), jnp.float32),
                      jnp.zeros((b, l, e))) for _ in range(2)]
  mask_BxL = jnp.asarray(np.arange(l)[None, :] < np.array([[5], [3], [1]]), jnp.int32)
  fn = jax.jit(routing.sample_gate_sums, static_argnums=2) if jit else routing.sample_gate_sums
  sums_NxBxE = np.asarray(fn(routings, mask_BxL, e))
  expected = np.zeros((2, b, e))
  for n, r in enumerate(routings):
    for i in range(b):
      for t in range(int(mask_BxL[i].sum())):
        for j in range(k):
          expected[n, i, int(r.expert_ids[i, t, j])] += float(r.weights[i, t, j])
  np.testing.assert_allclose(sums_NxBxE, expected, rtol=1e-6)
  totals = accumulate(RoutingTotals.zeros(2, e), routings, mask_BxL)
  np.testing.assert_allclose(sums_NxBxE.sum(axis=1), totals.gate_sums, rtol=1e-6)


def _samples(rng, n_samples, lengths, k, e):
  """Per sample, per layer, (ids [L, K], weights [L, K]) with distinct ids per token."""
  return [[(np.stack([rng.choice(e, k, replace=False) for _ in range(length)]), rng.random((length, k)))
           for _ in range(2)] for length in lengths[:n_samples]]


def test_logs_read_per_line_and_figures_from_logs(tmp_path):
  rng = np.random.default_rng(1)
  k, e = 2, 8
  samples = _samples(rng, 4, [3, 2, 4, 1], k, e)
  write_routing_logs(tmp_path / "a", [1, 2], samples[:3])
  write_routing_logs(tmp_path / "a" / "rank_1", [1, 2], samples[3:])  # read after the top folder's lines
  read = routing.read_sample_gate_sums(tmp_path / "a", top_k=k, num_experts=e)
  assert read.layer_ids == [1, 2] and read.top_k == k and read.gate_sums_NxSxE.shape == (2, 4, e)
  for s, per_layer in enumerate(samples):
    for n, (ids, weights) in enumerate(per_layer):
      expected_E = np.bincount(ids.reshape(-1), np.round(weights, 4).reshape(-1), minlength=e)
      np.testing.assert_allclose(read.gate_sums_NxSxE[n, s], expected_E, atol=1e-12)

  narrow = [[(ids % 4, w) for ids, w in per_layer] for per_layer in _samples(rng, 2, [2, 2], k, 4)]
  write_routing_logs(tmp_path / "b", [1, 2], narrow)  # ids 0..3 only: E inferred as 4, padded to 8
  result = routing.routing_figures_from_logs({"a": tmp_path / "a", "b": tmp_path / "b"}, tmp_path / "out", top_k=k)
  assert len(result["concentration"]["b"]) == e and result["concentration"]["b"][4:] == [0.0] * 4
  assert (tmp_path / "out" / routing.FIGURES_JSON).exists()
  write_routing_logs(tmp_path / "c", [1, 3], narrow)
  with pytest.raises(ValueError, match="different MoE layers"):
    routing.routing_figures_from_logs({"a": tmp_path / "a", "c": tmp_path / "c"}, top_k=k)


@pytest.fixture(scope="module")
def intent_figures(esft_reference, tmp_path_factory):
  out = tmp_path_factory.mktemp("intent_figures")
  return routing.routing_figures_from_logs({"intent": esft_reference / "intent" / "routing_logs"}, out), out


def test_intent_logs_overlap_and_concentration(intent_figures):
  result, out = intent_figures
  assert result["top_k"] == 6 and result["layers"] == list(range(1, 27)) and result["samples"] == {"intent": 127}
  # Top-6 experts shared by the logs' two halves, mean over layers: 5.81.
  assert 5.6 < result["overlap"]["intent"]["intent"] < 6.0
  shares = result["concentration"]["intent"]
  assert len(shares) == 64 and abs(sum(shares) - 1) < 1e-9 and shares == sorted(shares, reverse=True)
  # The share of the expert at each rank, mean over layers.
  np.testing.assert_allclose([shares[r - 1] for r in (1, 2, 4, 8, 16, 32, 64)],
                             [0.075, 0.064, 0.051, 0.034, 0.021, 0.010, 0.001], atol=6e-4)
  assert json.loads((out / routing.FIGURES_JSON).read_text()) == result


def _assert_png(path):
  data = path.read_bytes()
  assert len(data) > 1000 and data[:8] == PNG_MAGIC
  assert not list(path.parent.glob("*.tmp"))


def test_figures_write_png_without_a_display(tmp_path, monkeypatch):
  monkeypatch.delenv("DISPLAY", raising=False)
  monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
  a = np.array([[[1, 1, 1, 0], [0, 0, 5, 5]], [[0, 0, 2, 1], [9, 9, 0, 0]]], float)
  b = np.array([[[9, 9, 0, 0], [0, 1, 1, 1]], [[5, 5, 0, 0], [0, 0, 1, 1]]], float)
  result = routing.routing_figures({"a": a, "b": b}, top_k=2)
  for path in figures.plot_routing_figures(result, tmp_path / "figs"):
    _assert_png(path)
  configs = {("a", "token"): {"experts": {"1": [0, 2], "2": [1]}}, ("a", "gate"): {"experts": {"1": [0], "2": [3]}},
             ("b", "token"): {"experts": {"2": [1, 2, 3], "1": [0]}}}
  _assert_png(figures.plot_selected_experts(configs, tmp_path / figures.SELECTED_EXPERTS_PNG))
  with pytest.raises(ValueError, match="needs 'experts'"):
    figures.plot_selected_experts({("a", "token"): {"layers": {}}}, tmp_path / "bad.png")
  assert not (tmp_path / "bad.png").exists()


def test_intent_figures_png(intent_figures, esft_reference, tmp_path):
  result, _ = intent_figures
  for path in figures.plot_routing_figures(result, tmp_path):
    _assert_png(path)
  config = json.loads((esft_reference / "intent" / "expert_config_token_p0.2.json").read_text())
  _assert_png(figures.plot_selected_experts({("intent", "token"): config}, tmp_path / figures.SELECTED_EXPERTS_PNG))
