"""The ablations: typed configs and their errors, the aggregation over seeds and the findings' rule on hand-made
results, and every ablation end to end on the demo's micro preset (one of them over two seeds, resumed)."""

import json
import shutil
from pathlib import Path

import pytest

from esft_jax.ablations.config import (AblationConfigError, GranularityScratchConfig, ScratchVariant,
                                       load_ablation_config)
from esft_jax.ablations.report import GRANULARITY_PNG, Cells, _random_findings, cell, combine
from esft_jax.ablations.runner import WHAT_TO_TRAIN, check_fits_preset, run_ablation
from esft_jax.demo.experiment import METHODS, PRESETS
from tests.test_demo import MICRO

REPO = Path(__file__).resolve().parents[1]

CONFIGS = {
    "threshold": {"ablation": "threshold", "tasks": ["intent"], "token_p": [0.1, 0.6], "gate_p": [0.3],
                  "lora_ranks": [2]},
    "what_to_train": {"ablation": "what_to_train", "tasks": ["intent"], "score": "token", "p": 0.2},
    "random_experts": {"ablation": "random_experts", "tasks": ["intent"], "score": "token", "p": 0.2},
    "granularity_groups": {"ablation": "granularity_groups", "tasks": ["intent"], "group_sizes": [1, 2]},
    # 8 x 16 with a shared width of 16 is the micro base itself; 16 x 8 (two shared of 8) is pretrained.
    "granularity_scratch": {"ablation": "granularity_scratch", "tasks": ["intent"],
                            "variants": [{"experts": 8, "shared_width": 16}, {"experts": 16, "shared_width": 16}]},
}


def _error(tmp_path: Path, config) -> str:
  path = tmp_path / "bad.json"
  path.write_text(json.dumps(config))
  with pytest.raises(AblationConfigError) as error:
    load_ablation_config(path)
  assert str(error.value).startswith(f"{path}: ")
  return str(error.value)


def test_configs_are_typed_and_bad_ones_name_the_key_value_and_fix(tmp_path):
  scratch = load_ablation_config(REPO / "configs/ablations/granularity_scratch.json")
  assert isinstance(scratch, GranularityScratchConfig) and scratch.tasks == ("law",)
  assert scratch.variants[0] == ScratchVariant(experts=4, shared_width=0)
  with pytest.raises(AttributeError):  # frozen
    scratch.tasks = ("math",)
  for path in sorted((REPO / "configs/ablations").glob("*.json")):
    load_ablation_config(path)
  threshold = {"ablation": "threshold", "tasks": ["intent"], "token_p": [0.1], "gate_p": [0.1], "lora_ranks": [2]}
  assert "'ablation' must be one of ['threshold'," in _error(tmp_path, {**threshold, "ablation": "granularity?"})
  assert "'tasks' item 0 is 'poetry', out of range: it must be a task of ['math'," in _error(
      tmp_path, {**threshold, "tasks": ["poetry"]})
  assert "unknown key 'lora_rank'; a threshold config takes ['ablation', 'tasks', 'token_p', 'gate_p', " \
         "'lora_ranks']" in _error(tmp_path, {**threshold, "lora_rank": [2]})
  assert "missing key 'gate_p'" in _error(tmp_path, {k: v for k, v in threshold.items() if k != "gate_p"})
  assert "'token_p' item 1 is 1.5, out of range: it must be a threshold p in (0, 1]" in _error(
      tmp_path, {**threshold, "token_p": [0.1, 1.5]})
  assert "'token_p' must be a non-empty list, got 0.1" in _error(tmp_path, {**threshold, "token_p": 0.1})
  assert "'lora_ranks' item 0 must be an integer, got 2.5" in _error(tmp_path, {**threshold, "lora_ranks": [2.5]})
  assert "'lora_ranks' item 0 must be an integer, got True" in _error(tmp_path, {**threshold, "lora_ranks": [True]})
  assert "'group_sizes' lists 2 more than once" in _error(
      tmp_path, {"ablation": "granularity_groups", "tasks": ["math"], "group_sizes": [2, 2]})
  assert "'group_sizes' item 1 is 0, out of range" in _error(
      tmp_path, {"ablation": "granularity_groups", "tasks": ["math"], "group_sizes": [2, 0]})
  assert "'variants' item 0: missing key 'shared_width'" in _error(
      tmp_path, {"ablation": "granularity_scratch", "tasks": ["math"], "variants": [{"experts": 4}]})
  assert "'score' is 'random', out of range: it must be 'token' or 'gate'" in _error(
      tmp_path, {"ablation": "random_experts", "tasks": ["math"], "score": "random", "p": 0.2})
  assert "unknown key 'seeds' (the seeds are the command's --seed)" in _error(
      tmp_path, {"ablation": "random_experts", "tasks": ["math"], "score": "token", "p": 0.2, "seeds": [0]})
  with pytest.raises(FileNotFoundError, match="missing.json: not found; see configs/ablations"):
    load_ablation_config(tmp_path / "missing.json")


def test_configs_that_do_not_fit_the_preset_fail_before_any_work(tmp_path):
  with pytest.raises(ValueError, match=r"group sizes \[4\] do not divide this preset's 64 routed experts and the "
                                       r"6 active per token; use sizes from \[1, 2\], or set 'active_experts'"):
    run_ablation(REPO / "configs/ablations/granularity_groups.json", tmp_path / "out", preset_name="small")
  too_many = tmp_path / "too_many.json"
  too_many.write_text(json.dumps({"ablation": "granularity_groups", "tasks": ["math"], "group_sizes": [1],
                                  "active_experts": 65}))
  with pytest.raises(ValueError, match="too_many.json: 'active_experts' is 65, more than this preset's 64 routed"):
    run_ablation(too_many, tmp_path / "out", preset_name="small")
  with pytest.raises(ValueError, match=r"granularity_scratch.json: experts=4: the base's 64 experts of width 128, "
                                       r"top-6, do not split evenly into 4 experts"):
    run_ablation(REPO / "configs/ablations/granularity_scratch.json", tmp_path / "out", preset_name="small")
  with pytest.raises(ValueError, match=r"seeds \[0, 1, 0\] name seed 0 more than once"):
    run_ablation(REPO / "configs/ablations/threshold.json", tmp_path / "out", seeds=(0, 1, 0))
  with pytest.raises(ValueError, match=r"--lr-search .*missing.json: cannot read it"):
    run_ablation(REPO / "configs/ablations/threshold.json", tmp_path / "out", lr_search_from=tmp_path / "missing.json")
  assert not (tmp_path / "out").exists()
  for name in ("granularity_groups.json", "granularity_groups_small.json", "granularity_scratch.json",
               "granularity_scratch_small.json"):  # each fits the preset it is for
    preset = "small" if "small" in name else "tiny"
    check_fits_preset(load_ablation_config(REPO / "configs/ablations" / name), name, PRESETS[preset])


def _random_results(scored: dict[int, list[float]], random: dict[int, list[float]]) -> dict:
  """random_experts results of two tasks; scores per seed, one per task."""
  rows = lambda seed: [{"seed": seed, "task": task, "variant": variant, "experts_per_layer": 2.0,
                        "task_score": scores[seed][i], "general_loss": 1.0 + i, "general_score": 0.5}
                       for variant, scores in (("scored", scored), ("random", random))
                       for i, task in enumerate(("a", "b"))]
  return {"seeds": list(scored), "tasks": ["a", "b"], "config": {"score": "token"},
          "per_seed": {str(s): {"rows": rows(s), "base": {"a": 0.1, "b": 0.2, "general_loss": 1.0}} for s in scored}}


def test_seed_aggregation_is_mean_and_std_over_seeds_of_the_task_mean():
  cells = Cells(_random_results({0: [0.5, 0.7], 1: [0.7, 0.9], 2: [0.3, 0.5]}, {0: [0.1, 0.1], 1: [0.1, 0.1],
                                                                                  2: [0.1, 0.1]}))
  assert cells.variants == ["scored", "random"]
  assert cells.get("scored", "task_score") == {"0": [0.5, 0.7], "1": [0.7, 0.9], "2": [0.3, 0.5]}
  mean, std = cell(cells.get("scored", "task_score"))  # seed means 0.6, 0.8, 0.4
  assert mean == pytest.approx(0.6) and std == pytest.approx(0.2)
  assert cell(cells.get("scored", "general_loss")) == (pytest.approx(1.5), 0.0)
  assert cells.base() == {s: [0.1, 0.2] for s in ("0", "1", "2")}
  assert cells.base("general_loss")["1"] == [1.0, 1.0]
  diff = combine(lambda a, b: a - b, cells.get("scored", "task_score"), cells.get("random", "task_score"))
  assert diff["2"] == pytest.approx([0.2, 0.4])
  assert cell(cells.get("scored", "task_score"))[1] > 0 and cell({"0": [0.3, 0.5]}) == (pytest.approx(0.4), 0.0)


def test_a_finding_holds_only_beyond_the_spread():
  # Scored beats random by 10 points on average, but the seeds disagree by more: not held.
  noisy = _random_findings(Cells(_random_results({0: [0.5, 0.5], 1: [0.2, 0.2]}, {0: [0.2, 0.2], 1: [0.3, 0.3]})))[0]
  assert not noisy["held"] and noisy["margin"] == pytest.approx(0.1) and noisy["spread"] > 0.1
  assert "std over 2 seeds" in noisy["evidence"] and "the paper's -2.8" in noisy["evidence"]
  steady = _random_findings(Cells(_random_results({0: [0.5, 0.6], 1: [0.55, 0.55]}, {0: [0.4, 0.5],
                                                                                       1: [0.45, 0.45]})))[0]
  assert steady["held"] and steady["margin"] == pytest.approx(0.1)
  # One seed: the spread is the standard error over tasks.
  one = _random_findings(Cells(_random_results({0: [0.5, 0.2]}, {0: [0.2, 0.3]})))[0]
  assert not one["held"] and "standard error over 2 tasks, one seed" in one["evidence"]
  assert one["spread"] == pytest.approx(0.2)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  return tmp_path_factory.mktemp("ablations")


def _run(workspace: Path, name: str, **kwargs) -> dict:
  config_path = workspace / f"{name}.json"
  config_path.write_text(json.dumps(CONFIGS[name]))
  return run_ablation(config_path, workspace, preset=MICRO, log=kwargs.pop("log", lambda _: None), **kwargs)


def _check_report(workspace: Path, name: str, results: dict) -> dict:
  """The report, figure and results.json; the rows of the first seed by variant."""
  root = workspace / "ablations" / name
  report = (root / "REPORT.md").read_text()
  stored = json.loads((root / "results.json").read_text())
  assert stored["findings"] == results["findings"] and stored["seeds"] == results["seeds"]
  assert results["findings"] and all(set(f) >= {"finding", "held", "evidence"} and isinstance(f["held"], bool)
                                     for f in results["findings"])
  assert report.count("**held**") + report.count("**did not hold**") == len(results["findings"])
  assert (root / "figure.png").read_bytes()[:4] == b"\x89PNG"
  return {r["variant"]: r for r in results["per_seed"][str(results["seeds"][0])]["rows"]}


def test_random_experts_over_two_seeds_resumes_per_seed(workspace):
  one = _run(workspace, "random_experts", seeds=(0,))  # the workspace's learning-rate search runs first
  # An earlier demo's search with other rates than the workspace's is refused before anything runs.
  other = workspace / "other_lr_search.json"
  other.write_text(json.dumps({"grid": [1e-3], "tasks": ["intent"], "seed": 0, "setting": "mixed",
                               "mean_val_loss": {m: {"0.001": 1.0} for m in METHODS},
                               "chosen": {m: 1e-3 if m != "FFT" else 3e-3 for m in METHODS}}))
  with pytest.raises(ValueError, match=r"lr_search.json holds other learning rates than --lr-search .*other_lr"):
    _run(workspace, "random_experts", seeds=(0, 1), lr_search_from=other)
  assert not (workspace / "seed-1").exists()
  runs = workspace / "ablations/random_experts/seed-0/runs"
  seed0 = [path for name in ("summary.json", "eval.json") for path in runs.glob(f"*/{name}")]
  written = {path: path.stat().st_mtime_ns for path in seed0}
  both = _run(workspace, "random_experts", seeds=(0, 1))
  assert both["per_seed"]["0"] == one["per_seed"]["0"]  # seed 0 read back from its cache, not run again
  assert len(seed0) == 4 and all(path.stat().st_mtime_ns == written[path] for path in seed0)
  rows = _check_report(workspace, "random_experts", both)
  assert rows["random"]["trainable_params"] == rows["scored"]["trainable_params"]
  seed1 = {r["variant"]: r for r in both["per_seed"]["1"]["rows"]}
  # Each seed draws its own random experts and orders its own data.
  configs = [json.loads((workspace / "ablations/random_experts" / f"seed-{s}/expert_configs/intent-random.json")
                        .read_text())["experts"] for s in (0, 1)]
  assert configs[0] != configs[1] and seed1["scored"]["task_score"] is not None
  assert "std over 2 seeds" in both["findings"][0]["evidence"]
  assert "--seed\n0 1`" in (workspace / "ablations/random_experts/REPORT.md").read_text()


@pytest.mark.parametrize("name", [n for n in CONFIGS if n != "random_experts"])
def test_ablation_runs_and_reports(workspace, name):
  results = _run(workspace, name, seeds=(0,))
  rows = _check_report(workspace, name, results)
  if name == "threshold":
    assert set(rows) == {"token-p0.1", "token-p0.6", "gate-p0.3", "lora-r2"}
    assert rows["token-p0.1"]["experts_per_layer"] <= rows["token-p0.6"]["experts_per_layer"]
  elif name == "what_to_train":
    assert set(rows) == {v[0] for v in WHAT_TO_TRAIN} | {"everything (FFT)"}
    params = {k: r["trainable_params"] for k, r in rows.items()}
    assert params["relevant experts"] < params["+ shared experts"] < params["+ shared + non-expert"] \
        < params["everything (FFT)"]
    assert params["shared experts only"] < params["shared + non-expert"] < params["everything (FFT)"]
    assert "| 49.4 / 61.5 |" in (workspace / "ablations/what_to_train/REPORT.md").read_text()
  elif name == "granularity_groups":
    assert set(rows) == {f"G={g} {m}" for g in (1, 2) for m in ("ESFT-Token", "ESFT-Gate", "FFT")}
    assert rows["G=2 FFT"]["fine_experts_per_layer"] == 8 and rows["G=2 ESFT-Token"]["fine_experts_per_layer"] % 2 == 0
    assert rows["G=2 FFT"]["routed_experts"] == 4
    seed0 = results["per_seed"]["0"]
    assert sorted(i for g in seed0["groups"]["2"]["1"] for i in g) == list(range(8))
    assert seed0["group_similarity"]["2"] >= seed0["pair_similarity"]
  else:
    assert {r["experts"] for r in rows.values()} == {8, 16}
    assert all(0 < r["concentration"] <= 1 and 0 < r["selected_fraction"] <= 1 for r in rows.values())
    # Equal parameters: the two bases differ only in the router's width (8 vs 16 outputs per MoE layer).
    fft = rows["E16-k4-shared16 FFT"]["trainable_params"] - rows["E8-k2-shared16 FFT"]["trainable_params"]
    assert fft == 8 * MICRO.base.hidden_size * (MICRO.base.num_layers - 1)
    assert set(results["per_seed"]["0"]["bases"]) == {"E8-k2-shared16", "E16-k4-shared16"}
  if name.startswith("granularity"):
    assert (workspace / "ablations" / GRANULARITY_PNG).read_bytes()[:4] == b"\x89PNG"
  if name == "granularity_groups":
    # With a run removed, a spawned worker redoes it, rebuilding the workspace of the grouped base it ran on; the
    # others are read from their caches.
    shutil.rmtree(workspace / "ablations" / name / "seed-0" / "runs" / "intent-G=2 ESFT-Token")
    logs = []
    again = _run(workspace, name, seeds=(0,), log=logs.append, workers=2)
    assert any(line.startswith("G=2 ESFT-Token on intent (seed 0) (") for line in logs)
    assert again["per_seed"]["0"]["rows"] == results["per_seed"]["0"]["rows"]
