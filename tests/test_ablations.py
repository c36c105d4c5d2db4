"""The ablations end to end on the demo's micro preset: rows, report, figure, resuming, and config errors."""

import json
import shutil
from pathlib import Path

import pytest

from esft_jax.ablations.runner import WHAT_TO_TRAIN, _check_fits_preset, load_ablation_config, run_ablation
from esft_jax.demo.experiment import PRESETS
from tests.test_demo import MICRO

CONFIGS = {
    "threshold": {"ablation": "threshold", "tasks": ["intent"], "token_p": [0.1, 0.6], "gate_p": [0.3],
                  "lora_ranks": [2]},
    "what_to_train": {"ablation": "what_to_train", "tasks": ["intent"], "score": "token", "p": 0.2},
    "random_experts": {"ablation": "random_experts", "tasks": ["intent"], "score": "token", "p": 0.2,
                       "seeds": [0, 1]},
    "granularity_groups": {"ablation": "granularity_groups", "tasks": ["intent"], "group_sizes": [2]},
    # 8 x 16 with a shared width of 16 is the micro base itself; 16 x 8 (two shared of 8) is pretrained.
    "granularity_scratch": {"ablation": "granularity_scratch", "tasks": ["intent"],
                            "variants": [{"experts": 8, "shared_width": 16}, {"experts": 16, "shared_width": 16}]},
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  return tmp_path_factory.mktemp("ablations")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ablation_runs_and_reports(workspace, name):
  config_path = workspace / f"{name}.json"
  config_path.write_text(json.dumps(CONFIGS[name]))
  results = run_ablation(config_path, workspace, preset=MICRO, log=lambda _: None)
  root = workspace / "ablations" / name
  report = (root / "REPORT.md").read_text()
  assert "agrees with the paper" in report or "does not agree with the paper" in report
  assert (root / "figure.png").read_bytes()[:4] == b"\x89PNG"
  assert json.loads((root / "results.json").read_text())["rows"] == results["rows"]
  rows = {r["variant"]: r for r in results["rows"]}
  if name == "threshold":
    assert set(rows) == {"token-p0.1", "token-p0.6", "gate-p0.3", "lora-r2"}
    assert rows["token-p0.1"]["experts_per_layer"] <= rows["token-p0.6"]["experts_per_layer"]
  elif name == "what_to_train":
    assert set(rows) == {v[0] for v in WHAT_TO_TRAIN} | {"everything (FFT)"}
    params = {k: r["trainable_params"] for k, r in rows.items()}
    assert params["relevant experts"] < params["+ shared experts"] < params["everything (FFT)"]
    assert params["shared experts only"] < params["shared + non-expert"] < params["everything (FFT)"]
  elif name == "granularity_groups":
    assert set(rows) == {f"G=2 {m}" for m in ("ESFT-Token", "ESFT-Gate", "FFT")}
    assert rows["G=2 FFT"]["fine_experts_per_layer"] == 8 and rows["G=2 ESFT-Token"]["fine_experts_per_layer"] % 2 == 0
    assert sorted(i for g in results["groups"]["2"]["1"] for i in g) == list(range(8))
    assert results["group_similarity"]["2"] >= results["pair_similarity"]
  elif name == "granularity_scratch":
    assert {r["experts"] for r in rows.values()} == {8, 16}
    assert all(0 < r["concentration"] <= 1 and 0 < r["selected_fraction"] <= 1 for r in rows.values())
    # Equal parameters: the two bases differ only in the router's width (8 vs 16 outputs per MoE layer).
    fft = rows["E16-k4-shared16 FFT"]["trainable_params"] - rows["E8-k2-shared16 FFT"]["trainable_params"]
    assert fft == 8 * MICRO.base.hidden_size * (MICRO.base.num_layers - 1)
    assert set(results["bases"]) == {"E8-k2-shared16", "E16-k4-shared16"}
  else:
    scored = next(r for k, r in rows.items() if k.startswith("scored"))
    for seed in (0, 1):
      assert rows[f"random seed {seed}"]["trainable_params"] == scored["trainable_params"]
  # A second call reuses every cached run and evaluation.
  assert run_ablation(config_path, workspace, preset=MICRO, log=lambda _: None)["rows"] == results["rows"]
  if name == "granularity_groups":
    # With a run removed, a spawned worker redoes it, rebuilding the workspace of the grouped base it ran on.
    shutil.rmtree(root / "runs" / "intent-G=2 ESFT-Token")
    logs = []
    again = run_ablation(config_path, workspace, preset=MICRO, log=logs.append, workers=2)
    assert any(line.startswith("G=2 ESFT-Token on intent (") for line in logs)
    assert again["rows"] == results["rows"]


def test_bad_ablation_configs_name_the_problem(tmp_path):
  path = tmp_path / "bad.json"
  path.write_text(json.dumps({"ablation": "granularity?", "tasks": ["intent"]}))
  with pytest.raises(ValueError, match="'ablation' must be one of"):
    load_ablation_config(path)
  path.write_text(json.dumps({"ablation": "threshold", "tasks": ["poetry"]}))
  with pytest.raises(ValueError, match="unknown: \\['poetry'\\]"):
    load_ablation_config(path)
  with pytest.raises(FileNotFoundError, match="missing.json: not found; see configs/ablations"):
    load_ablation_config(tmp_path / "missing.json")
  path.write_text(json.dumps({"ablation": "granularity_groups", "tasks": ["math"], "group_sizes": [2, 0]}))
  with pytest.raises(ValueError, match="'group_sizes' must be a non-empty list of positive integers"):
    load_ablation_config(path)
  path.write_text(json.dumps({"ablation": "granularity_scratch", "tasks": ["math"], "variants": [{"experts": 4}]}))
  with pytest.raises(ValueError, match="'variants' must be a non-empty list"):
    load_ablation_config(path)


def test_configs_that_do_not_fit_the_preset_fail_before_any_work(tmp_path):
  repo = Path(__file__).resolve().parents[1]
  with pytest.raises(ValueError, match=r"group sizes \[4\] do not divide this preset's 64 routed experts and the "
                                       r"6 active per token; use sizes from \[1, 2\], or set 'active_experts'"):
    run_ablation(repo / "configs/ablations/granularity_groups.json", tmp_path / "out", preset_name="small")
  too_many = tmp_path / "too_many.json"
  too_many.write_text(json.dumps({"ablation": "granularity_groups", "tasks": ["math"], "group_sizes": [1],
                                  "active_experts": 65}))
  with pytest.raises(ValueError, match="too_many.json: 'active_experts' is 65, more than this preset's 64 routed"):
    run_ablation(too_many, tmp_path / "out", preset_name="small")
  assert not (tmp_path / "out").exists()
  with pytest.raises(ValueError, match=r"granularity_scratch.json: experts=4: the base's 64 experts of width 128, "
                                       r"top-6, do not split evenly into 4 experts"):
    run_ablation(repo / "configs/ablations/granularity_scratch.json", tmp_path / "out", preset_name="small")
  assert not (tmp_path / "out").exists()
  for name in ("granularity_groups.json", "granularity_groups_small.json", "granularity_scratch.json",
               "granularity_scratch_small.json"):  # each fits the preset it is for
    preset = "small" if "small" in name else "tiny"
    _check_fits_preset(load_ablation_config(repo / "configs/ablations" / name), name, PRESETS[preset])
