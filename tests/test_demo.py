"""The demo end to end at a micro scale (two tasks, every method): report, results, figures, resuming, and
worker processes."""

import dataclasses
import json
import os
import shutil

import pytest

from esft_jax.demo import experiment
from esft_jax.demo.experiment import METHODS, PRESETS, run_demo
from esft_jax.demo.report import protocol_text
from esft_jax.demo.pretrain import AlignSpec, BaseSpec
from esft_jax.demo.workspace import Job, prepare, run_jobs

MICRO = dataclasses.replace(
    PRESETS["tiny"],
    base=BaseSpec(vocab_size=320, hidden_size=32, num_layers=2, num_heads=2, routed_experts=8, experts_per_token=2,
                  shared_experts=1, expert_width=16, dense_width=64, kv_lora_rank=16, seq_length=64,
                  general_chars=15_000, held_out_chars=2_000, enhancement_examples=8, steps=3, batch_size=4,
                  lr=3e-3, expert_impl="grouped"),
    align=AlignSpec(examples_per_family=12, steps=2, batch_size=4, lr=1e-3),
    n_train=40, n_test=4, n_general_test=2, score_tokens=300, finetune_steps=2, finetune_batch=2,
    finetune_seq_length=64, lr_grid=(1e-3,), search_tasks=("intent",), max_new_tokens=8, eval_batch=4)


def test_demo_runs_end_to_end_resumes_and_adds_seeds(tmp_path, monkeypatch):
  # The expert implementation is how the base is computed, not what it is: it does not name another base.
  assert dataclasses.replace(MICRO.base, expert_impl="reference").key() == MICRO.base.key()
  tasks, methods = ("intent", "translation"), ("FFT", "LoRA", "ESFT-Token", "ESFT-Gate")
  logs = []
  results = run_demo(tmp_path, preset=MICRO, task_names=tasks, log=logs.append)
  report = (tmp_path / "REPORT.md").read_text()
  for section in ("## Protocol", "## Table 1: downstream tasks", "## Table 2: general ability",
                  "## Learning-rate search", "## Diagnostics"):
    assert section in report
  for name in ("figures/summary.png", "figures/validation_curves.png", "seed-0/figures/figure2_concentration.png",
               "seed-0/figures/figure3_overlap.png", "seed-0/figures/figure4_selected_experts.png"):
    assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
  stored = json.loads((tmp_path / "results.json").read_text())
  assert stored["seeds"] == [0] and stored["findings"] == results["findings"]
  assert len(stored["findings"]) == 5 and report.count("**held**") + report.count("**did not hold**") == 5
  assert all(set(f) >= {"finding", "held", "evidence"} and isinstance(f["held"], bool) for f in stored["findings"])
  assert "one seed" in stored["findings"][2]["evidence"]
  search = stored["lr_search"]
  assert search["grid"] == [1e-3] and set(search["chosen"]) == set(methods) and search["tasks"] == ["intent"]
  runs = stored["per_seed"]["0"]["runs"]["mixed"]
  assert set(runs) == set(tasks) and all(set(runs[t]) == set(methods) for t in tasks)
  # Each fine-tuned model is scored on its own task and on general ability; the aligned base on everything.
  scores = runs["intent"]["ESFT-Token"]["scores"]
  assert set(scores) == {"intent", "recall", "reverse", "category", "opposite", "general_score", "general_loss"}
  assert set(stored["per_seed"]["0"]["base"]) >= set(tasks) | {"general_score", "general_loss"}
  # The efficiency table's wall time leaves out the search's runs (intent here): translation's runs alone.
  fft_row = next(line for line in report.splitlines() if line.startswith("| FFT |") and line.count("|") == 7)
  assert fft_row.split("|")[2].strip() == f"{runs['translation']['FFT']['seconds']:.1f}"
  # The alignment's validation curve, at each of its evaluations, is kept and shown: whether it had flattened.
  assert [step for step, _ in stored["per_seed"]["0"]["alignment_val_loss"]] == [1, 2]
  assert "The alignment's validation loss" in report and f"for {MICRO.align.steps} steps" in report
  assert 0 < runs["intent"]["ESFT-Token"]["trainable_params"] < runs["intent"]["FFT"]["trainable_params"]
  # Mixed training data: the task's records and as many alignment records, shuffled together.
  mixed = (tmp_path / "seed-0" / "data" / "intent_mixed_train.jsonl").read_text().splitlines()
  assert len(mixed) == 2 * MICRO.n_train

  # A second seed: its own tasks, aligned base and runs; seed 0 is read back, and the findings' spread is now
  # the standard deviation over the two seeds.
  logs.clear()
  both = run_demo(tmp_path, preset=MICRO, task_names=tasks, log=logs.append, seeds=(0, 1))
  assert any(line.startswith("reusing") and "base-" in line for line in logs)
  assert both["per_seed"]["0"] == results["per_seed"]["0"]
  assert (tmp_path / "seed-1" / "data" / "intent_test.jsonl").read_text() != \
      (tmp_path / "seed-0" / "data" / "intent_test.jsonl").read_text()
  assert all("std over 2 seeds" in f["evidence"] for f in both["findings"])

  # With one run removed, `workers=2` redoes it in a spawned worker; the others come from their caches. The
  # workers share the parent's device, so neither preallocates it (an H200 ran out of memory when the parent did).
  run = next((tmp_path / "seed-0" / "runs").glob("intent-ESFT-Token-mixed-*"))
  shutil.rmtree(run)
  logs.clear()
  monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
  again = run_demo(tmp_path, preset=MICRO, task_names=tasks, log=logs.append, workers=2)
  assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
  assert any(line.startswith("ESFT-Token on intent (mixed") and "fine-tuned in" in line for line in logs)
  assert again["per_seed"]["0"]["runs"]["mixed"]["translation"]["FFT"] == runs["translation"]["FFT"]
  assert (run / "eval.json").exists()

  # A job's error reaches the caller from its worker, naming what is wrong, and leaves no run behind.
  ws = prepare(tmp_path, MICRO, 0, log=lambda _: None, task_names=tasks)
  bad = Job("ESFT-Token on intent", "intent", "esft", tmp_path / "runs" / "bad", 1e-3, tmp_path / "missing.json")
  with pytest.raises(Exception, match="missing.json"):
    run_jobs([(ws, bad)], workers=2, log=lambda _: None)
  assert not (tmp_path / "runs" / "bad" / "summary.json").exists()


def _synthetic_results(task_scores: dict[str, list[float]], general: dict[str, list[float]]) -> dict:
  """Results of two tasks and len(scores) seeds, each method scoring the same on both tasks."""
  tasks, methods = ["a", "b"], list(task_scores)
  seeds = list(range(len(task_scores["FFT"])))
  routing = {"concentration": {t: [0.5, 0.3, 0.1, 0.1] for t in tasks},
             "overlap": {a: {b: 1.0 if a == b else 0.5 for b in tasks} for a in tasks}}
  per_seed = {str(s): {"routing": routing, "base": {"general_score": 0.5},
                       "runs": {"mixed": {t: {m: {"scores": {t: task_scores[m][s], "general_score": general[m][s],
                                                             "general_loss": 1.0}} for m in methods} for t in tasks}}}
              for s in seeds}
  return {"seeds": seeds, "tasks": tasks, "methods": methods, "settings": ["mixed"], "top_k": 1,
          "per_seed": per_seed}


def test_a_finding_holds_only_beyond_the_spread_over_seeds():
  from esft_jax.demo.report import findings

  # ESFT beats LoRA by 2 points on average, but the seeds disagree by more than that: not held.
  noisy = {"FFT": [0.50, 0.50, 0.50], "LoRA": [0.40, 0.46, 0.40], "ESFT-Token": [0.46, 0.40, 0.46],
           "ESFT-Gate": [0.46, 0.40, 0.46]}
  general = {"FFT": [0.3] * 3, "LoRA": [0.4] * 3, "ESFT-Token": [0.45, 0.46, 0.44], "ESFT-Gate": [0.45, 0.45, 0.45]}
  by_claim = {f["finding"].split(":")[0]: f for f in findings(_synthetic_results(noisy, general))}
  lora = by_claim["LoRA is behind ESFT on the trained tasks"]
  assert not lora["held"] and lora["margin"] == pytest.approx(0.02) and lora["spread"] > 0.02
  assert "std over 3 seeds" in lora["evidence"]
  # ESFT keeps 15 points more general ability than FFT in every seed: held.
  assert by_claim["ESFT keeps more general ability than FFT"]["held"]
  # ESFT at 0.92 and 0.80 of FFT: the worse variant decides, and it is short of 90%.
  near = {"FFT": [0.5] * 3, "LoRA": [0.3] * 3, "ESFT-Token": [0.46] * 3, "ESFT-Gate": [0.40] * 3}
  by_claim = {f["finding"].split(":")[0]: f for f in findings(_synthetic_results(near, general))}
  assert not by_claim["ESFT comes near FFT on the trained tasks"]["held"]
  assert by_claim["Routing is concentrated per task"]["held"]
  assert by_claim["Little overlap across tasks"]["held"]


def test_a_run_reuses_an_earlier_search_and_its_report_names_it(tmp_path, monkeypatch):
  earlier = tmp_path / "earlier_lr_search.json"
  search = {"grid": [1e-3], "tasks": ["intent"], "seed": 0, "setting": "mixed",
            "mean_val_loss": {m: {"0.001": 1.0} for m in METHODS}, "chosen": {m: 1e-3 for m in METHODS}}
  earlier.write_text(json.dumps({**search, "chosen": {"FFT": 1e-3}}))
  out = tmp_path / "out"
  with pytest.raises(ValueError, match=r"earlier_lr_search.json: .*no chosen rate for \['LoRA'"):
    run_demo(out, preset=MICRO, task_names=("intent",), log=lambda _: None, lr_search_from=earlier)
  assert not out.exists()  # refused before anything was written

  # Another preset's search (its grid is not this preset's) is refused too.
  earlier.write_text(json.dumps({**search, "grid": [3e-4, 1e-3]}))
  with pytest.raises(ValueError, match=r"earlier_lr_search.json: its grid \[0.0003, 0.001\] is not preset tiny's "
                                       r"\[0.001\]; pass a search an `esft-jax demo --preset tiny` ran"):
    run_demo(out, preset=MICRO, task_names=("intent",), log=lambda _: None, lr_search_from=earlier)
  assert not out.exists()

  earlier.write_text(json.dumps(search))
  monkeypatch.setattr(experiment, "search_learning_rates", lambda *a: pytest.fail("searched anyway"))
  monkeypatch.setattr(experiment, "_seed_results", lambda ws, methods, lr, workers, log: {"lr": lr})
  monkeypatch.setattr(experiment, "write_report", lambda out, results: None)
  results = run_demo(out, preset=MICRO, task_names=("intent",), log=lambda _: None, lr_search_from=earlier)
  assert results["per_seed"]["0"]["lr"] == search["chosen"]
  assert json.loads((out / "lr_search.json").read_text())["reused_from"] == str(earlier)
  assert f"those of the search in `{earlier}`" in protocol_text(results)
  assert "not searched" not in protocol_text({**results, "lr_search": search})
