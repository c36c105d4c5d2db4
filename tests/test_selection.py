"""Expert selection: the official config reproduced byte for byte, the rule on hand-made ties, the random
ablation, and the validation of configs and inputs."""

from __future__ import annotations

import json

import pytest

from esft_jax.esft.selection import load_expert_config, random_like, select_experts, write_expert_config

# Experts selected per layer (1..26) in the release's intent token config (expert_config_token_p0.2.json).
INTENT_TOKEN_SIZES = [5, 6, 6, 6, 5, 5, 4, 4, 4, 5, 5, 5, 4, 4, 5, 4, 5, 4, 5, 5, 5, 4, 5, 4, 5, 5]


@pytest.fixture(scope="module")
def intent_summary(esft_reference):
  return json.loads((esft_reference / "intent" / "summary.json").read_text())


def test_reference_token_config_is_reproduced(esft_reference, intent_summary, tmp_path):
  reference_file = esft_reference / "intent" / "expert_config_token_p0.2.json"
  config = select_experts(intent_summary, "token", 0.2)
  assert config == json.loads(reference_file.read_text())
  assert [len(config["experts"][str(layer)]) for layer in range(1, 27)] == INTENT_TOKEN_SIZES
  write_expert_config(tmp_path / "expert_config.json", config)
  assert (tmp_path / "expert_config.json").read_bytes() == reference_file.read_bytes()
  assert [p.name for p in tmp_path.iterdir()] == ["expert_config.json"]


def test_paper_default_gate_threshold(intent_summary):
  config = select_experts(intent_summary, "gate")  # p = 0.1 on the unnormalised gate score
  assert sum(len(ids) for ids in config["experts"].values()) == 123  # as the release's intent gate config


def _summary(scores_by_layer, method="token"):
  return {f"{method}_scores": {str(layer): {str(e): s for e, s in enumerate(scores)}
                               for layer, scores in scores_by_layer.items()}}


def _experts(summary, top_p, method="token"):
  return select_experts(summary, method, top_p)["experts"]


def test_ties_go_to_the_lower_id_and_the_crossing_expert_is_included():
  summary = _summary({1: [0.1, 0.3, 0.3, 0.3]})
  assert _experts(summary, 0.3) == {"1": [1]}  # 0.3 reaches p exactly: stop
  assert _experts(summary, 0.35) == {"1": [1, 2]}  # expert 2 crosses p and is kept
  assert _experts(summary, 0.65) == {"1": [1, 2, 3]}
  assert _experts(summary, 0.95) == {"1": [1, 2, 3, 0]}


def test_scores_are_compared_at_four_decimals():
  # 0.20004 and 0.20001 are both 0.2 at 4 decimals, a tie, so the lower id goes first.
  assert _experts(_summary({1: [0.20001, 0.20004, 0.6]}), 0.7) == {"1": [2, 0]}
  assert _experts(_summary({1: [0.20001, 0.20004, 0.6]}), 0.9) == {"1": [2, 0, 1]}


def test_top_p_one():
  # Token scores that sum to exactly 1 stop at the last non-zero expert.
  assert _experts(_summary({1: [0.25, 0.0, 0.5, 0.25]}), 1.0) == {"1": [2, 0, 3]}
  # Gate scores sum to the top-K mass (< 1), so the running sum never reaches 1: every expert is taken.
  assert _experts(_summary({1: [0.25, 0.0, 0.1, 0.05]}, "gate"), 1.0, "gate") == {"1": [0, 2, 3, 1]}


def test_layers_flags_and_expected_layers():
  summary = _summary({2: [0.6, 0.4], 3: [0.1, 0.9]})
  config = select_experts(summary, "token", 0.5, train_shared_experts=True, train_non_expert_modules=True,
                          expected_layers=[2, 3])
  assert config == {"experts": {"2": [0], "3": [1]}, "shared_experts": True, "non_expert_modules": True}
  assert select_experts(_summary({1: [1.0], 3: [1.0]}), "token", 0.5, expected_layers=[1, 3])["experts"] == {
      "1": [0], "3": [0]}


@pytest.mark.parametrize("kwargs,message", [
    (dict(top_p=0.0), r"top_p=0.0 must be a number in \(0, 1\]"),
    (dict(top_p=-0.1), r"top_p=-0.1 must be a number in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p=1.5 must be a number in \(0, 1\]"),
    (dict(top_p=float("nan")), r"top_p=nan must be a number"),
    (dict(top_p="0.2"), r"top_p='0.2' must be a number"),
    (dict(method="random"), r"score method 'random' is unknown; use one of \('token', 'gate'\)"),
    (dict(method="gate"), r"the summary has no 'gate_scores' table"),
    (dict(summary=_summary({1: [1.0], 2: [1.0], 4: [1.0]})), r"layers \[3\] are missing between 1 and 4"),
    (dict(expected_layers=[1, 2, 3]), r"missing \[3\], unexpected \[\]"),
    (dict(expected_layers=[1]), r"missing \[\], unexpected \[2\]"),
    (dict(summary={"token_scores": {}}), r"no layers"),
    (dict(summary={"token_scores": {"one": {"0": 1.0}}}), r"layer 'one' is not a non-negative integer"),
    (dict(summary=_summary({1: ["high"]})), r"layer 1 expert 0: score 'high' is not a non-negative number"),
    (dict(summary={"token_scores": {"1": {}}}), r"layer 1: expected a non-empty"),
])
def test_bad_selection_input_raises_and_writes_nothing(tmp_path, monkeypatch, kwargs, message):
  monkeypatch.chdir(tmp_path)
  args = dict(summary=_summary({1: [0.5, 0.5], 2: [0.5, 0.5]}), method="token", top_p=0.2) | kwargs
  with pytest.raises(ValueError, match=message):
    select_experts(**args)
  assert list(tmp_path.iterdir()) == []


def test_random_like_keeps_counts_and_is_seeded():
  config = _config({str(layer): list(range(layer % 7)) for layer in range(1, 27)}, shared_experts=True)
  first, again, other = (random_like(config, 64, seed) for seed in (0, 0, 1))
  assert first == again and first != other
  assert first["shared_experts"] is True and first["non_expert_modules"] is False
  for layer, ids in config["experts"].items():
    drawn = first["experts"][layer]
    assert len(drawn) == len(ids) == len(set(drawn)) and all(0 <= e < 64 for e in drawn)
  with pytest.raises(ValueError, match=r"config: layer 1: expert id 2 is not in \[0, 2\)"):
    random_like({"experts": {"1": [0, 1, 2]}, "shared_experts": False, "non_expert_modules": False}, 2, 0)


def test_config_round_trip(tmp_path):
  config = {"experts": {"1": [3, 0], "10": [], "2": [1]}, "shared_experts": False, "non_expert_modules": True}
  path = tmp_path / "sub" / "expert_config.json"
  write_expert_config(path, config)
  assert path.read_text() == ('{"experts": {"1": [3, 0], "10": [], "2": [1]}, "shared_experts": false, '
                              '"non_expert_modules": true}')
  assert load_expert_config(path, num_experts=4, moe_layer_ids=[1, 2, 10]) == config


def _config(experts, **flags):
  return {"experts": experts, "shared_experts": False, "non_expert_modules": False, **flags}


@pytest.mark.parametrize("config,message", [
    (_config({"1": [0], "5": [1]}), r"layer 5 is not a MoE layer of the model"),
    (_config({"1": [0]}), r"MoE layers \[2\] are missing"),
    (_config({"1": [0], "2": [4]}), r"layer 2: expert id 4 is not in \[0, 4\)"),
    (_config({"1": [0], "2": [-1]}), r"layer 2: expert id -1 is not in \[0, 4\)"),
    (_config({"1": [0], "2": ["3"]}), r"layer 2: expert id '3' is not in \[0, 4\)"),
    (_config({"1": [2, 0, 2], "2": []}), r"layer 1: expert ids \[2\] are listed more than once"),
    (_config({"1": 0, "2": []}), r"layer 1: expected a list of expert ids, got 0"),
    (_config({"1": [0], "2": []}, shared_experts="no"), r"'shared_experts' must be true or false, got 'no'"),
    ({"experts": [[0]]}, r"an expert config needs an 'experts' object"),
])
def test_load_rejects_bad_configs(tmp_path, config, message):
  path = tmp_path / "expert_config.json"
  path.write_text(json.dumps(config))
  with pytest.raises(ValueError, match=rf"expert_config.json: .*{message}"):
    load_expert_config(path, num_experts=4, moe_layer_ids=[1, 2])


def test_write_rejects_bad_config_and_writes_nothing(tmp_path):
  with pytest.raises(ValueError, match=r"bad.json: layer 1: expert ids \[2\] are listed more than once"):
    write_expert_config(tmp_path / "bad.json", _config({"1": [2, 2]}))
  assert list(tmp_path.iterdir()) == []


def test_load_file_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.json: not found; write an expert config"):
    load_expert_config(tmp_path / "missing.json")
  (tmp_path / "broken.json").write_text("{")
  with pytest.raises(ValueError, match="broken.json: not valid JSON"):
    load_expert_config(tmp_path / "broken.json")
