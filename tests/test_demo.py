"""The demo end to end at a micro scale (two tasks, every method): report, results, figures, resuming, and
worker processes."""

import dataclasses
import json
import os
import shutil

import pytest

from esft_jax.demo.experiment import PRESETS, Job, prepare, run_demo, run_jobs
from esft_jax.demo.pretrain import BaseSpec

MICRO = dataclasses.replace(
    PRESETS["tiny"],
    base=BaseSpec(vocab_size=320, hidden_size=32, num_layers=2, num_heads=2, routed_experts=8, experts_per_token=2,
                  shared_experts=1, expert_width=16, dense_width=64, kv_lora_rank=16, seq_length=64,
                  general_chars=15_000, held_out_chars=2_000, format_examples_per_task=8, steps=3, batch_size=4,
                  lr=3e-3, expert_impl="grouped"),
    n_train=40, n_test=4, score_tokens=300, finetune_steps=2, finetune_batch=2, finetune_seq_length=64,
    max_new_tokens=8, eval_batch=4)


def test_demo_runs_end_to_end_and_resumes(tmp_path, monkeypatch):
  # The expert implementation is how the base is computed, not what it is: it does not name another base.
  assert dataclasses.replace(MICRO.base, expert_impl="reference").key() == MICRO.base.key()
  logs = []
  results = run_demo(tmp_path, preset=MICRO, task_names=("intent", "translation"), log=logs.append)
  report = (tmp_path / "REPORT.md").read_text()
  assert "## Table 1: downstream tasks" in report and "## Table 2: general ability" in report
  assert report.count("**held**") + report.count("**did not hold**") == 5
  for name in ("figure2_concentration.png", "figure3_overlap.png", "figure4_selected_experts.png"):
    assert (tmp_path / "figures" / name).read_bytes()[:4] == b"\x89PNG"
  stored = json.loads((tmp_path / "results.json").read_text())
  assert set(stored["evaluations"]) == {"base"} | {f"{t}-{m}" for t in ("intent", "translation")
                                                   for m in ("FFT", "LoRA", "ESFT-Token", "ESFT-Gate")}
  esft = stored["runs"]["intent"]["ESFT-Token"]["trainable_params"]
  assert 0 < esft < stored["runs"]["intent"]["FFT"]["trainable_params"]
  assert results["evaluations"] == stored["evaluations"]

  logs.clear()
  run_demo(tmp_path, preset=MICRO, task_names=("intent", "translation"), log=logs.append)
  assert any("reusing the pretrained base model" in line for line in logs)

  # With one run removed, `workers=2` redoes it in a spawned worker; the others come from their caches. The
  # workers share the parent's device, so neither preallocates it (an H200 ran out of memory when the parent did).
  run = tmp_path / "runs" / "intent-ESFT-Token"
  shutil.rmtree(run)
  logs.clear()
  monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
  again = run_demo(tmp_path, preset=MICRO, task_names=("intent", "translation"), log=logs.append, workers=2)
  assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
  assert again["resumed_runs"] == 7 and "reused 7 of 8 runs" in (tmp_path / "REPORT.md").read_text()
  assert any(line.startswith("ESFT-Token on intent (") and "fine-tuned in" in line for line in logs)
  assert again["evaluations"]["translation-FFT"] == results["evaluations"]["translation-FFT"]
  assert again["runs"]["intent"]["ESFT-Token"]["trainable_params"] == esft
  assert (run / "eval.json").exists()

  # A job's error reaches the caller from its worker, naming what is wrong, and leaves no run behind.
  ws = prepare(tmp_path, MICRO, log=lambda _: None, task_names=("intent", "translation"))
  bad = Job("ESFT-Token on intent", "intent", "esft", tmp_path / "runs" / "bad", 1e-3, tmp_path / "missing.json")
  with pytest.raises(Exception, match="missing.json"):
    run_jobs([(ws, bad)], workers=2, log=lambda _: None)
  assert not (tmp_path / "runs" / "bad" / "summary.json").exists()
