"""The paper's ablations on the demo's miniature: one config under configs/ablations/ per experiment.

Each ablation reuses the demo's workspace (tasks, the cached base, routing scores), fine-tunes the variants it
compares on the tasks its config names, evaluates each on every task and on held-out general text, and writes
REPORT.md, results.json and a figure into its own folder. Runs and evaluations are cached like the demo's, so an
interrupted ablation resumes.

    threshold       Figure 6: task and general scores against the average trained experts per layer, token and
                    gate scores over a range of p, LoRA ranks beside them.
    what_to_train   Table 3: relevant experts only; + shared experts; + non-expert modules; shared only;
                    shared + non-expert; everything (FFT).
    random_experts  Table 4: the scored selection against as many experts per layer drawn at random, per seed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from esft_jax.ablations.report import write_ablation_report
from esft_jax.demo.experiment import PRESETS, Workspace, prepare
from esft_jax.demo.tasks import TASK_NAMES
from esft_jax.esft.selection import random_like, select_experts, write_expert_config
from esft_jax.files import atomic_write_text, read_json

ABLATIONS = ("threshold", "what_to_train", "random_experts")


def load_ablation_config(path: str | Path) -> dict[str, Any]:
  config = read_json(path, "see configs/ablations/ for the ablation configs")
  if config.get("ablation") not in ABLATIONS:
    raise ValueError(f"{path}: 'ablation' must be one of {ABLATIONS}, got {config.get('ablation')!r}")
  unknown = sorted(set(config.get("tasks", [])) - set(TASK_NAMES))
  if not config.get("tasks") or unknown:
    raise ValueError(f"{path}: 'tasks' must be a non-empty list of {TASK_NAMES}; unknown: {unknown}")
  return config


class _Runner:
  """Fine-tunes and evaluates named variants of one ablation on each of its tasks."""

  def __init__(self, ws: Workspace, name: str, log):
    self.ws, self.log = ws, log
    self.root = ws.out / "ablations" / name
    self.rows: list[dict] = []

  def expert_config(self, task: str, variant: str, config: dict) -> Path:
    path = self.root / "expert_configs" / f"{task}-{variant}.json"
    write_expert_config(path, config)
    return path

  def run(self, task: str, variant: str, kind: str, lr: float, expert_config: dict | None = None,
          lora_rank: int = 8, **fields) -> dict:
    """Trains one variant on `task`, evaluates it, and records a row: the variant's fields, trainable
    parameters, experts per layer, own-task score, general loss and mean score on the other tasks."""
    self.log(f"{variant} on {task}")
    run_dir = self.root / "runs" / f"{task}-{variant}"
    config_path = self.expert_config(task, variant, expert_config) if expert_config is not None else None
    summary = self.ws.fine_tune(task, kind, run_dir, lr, config_path, lora_rank)
    scores = self.ws.evaluate_run(run_dir)
    others = [scores[t] for t in self.ws.tasks if t != task]
    row = {"task": task, "variant": variant, **fields, "trainable_params": summary["trainable_params"],
           "experts_per_layer": _experts_per_layer(expert_config) if expert_config is not None else None,
           "task_score": scores[task], "general_loss": scores["general_loss"],
           "other_tasks": float(np.mean(others)) if others else None}
    self.rows.append(row)
    return row


def _experts_per_layer(config: dict) -> float:
  return float(np.mean([len(ids) for ids in config["experts"].values()]))


def _threshold(runner: _Runner, config: dict) -> None:
  lr = runner.ws.preset.lr
  for task in config["tasks"]:
    for score in ("token", "gate"):
      for p in config[f"{score}_p"]:
        selection = select_experts(runner.ws.summaries[task], score, p)
        runner.run(task, f"{score}-p{p}", "esft", lr[f"ESFT-{score.title()}"], selection, score=score, p=p)
    for rank in config["lora_ranks"]:
      runner.run(task, f"lora-r{rank}", "lora", lr["LoRA"], lora_rank=rank, score="lora", rank=rank)


WHAT_TO_TRAIN = (  # (variant, trains the selected experts, shared experts, non-expert modules)
    ("relevant experts", True, False, False),
    ("+ shared experts", True, True, False),
    ("+ non-expert modules", True, False, True),
    ("shared experts only", False, True, False),
    ("shared + non-expert", False, True, True),
)


def _what_to_train(runner: _Runner, config: dict) -> None:
  lr = runner.ws.preset.lr
  for task in config["tasks"]:
    selection = select_experts(runner.ws.summaries[task], config["score"], config["p"])
    for variant, experts, shared, non_expert in WHAT_TO_TRAIN:
      chosen = selection["experts"] if experts else {layer: [] for layer in selection["experts"]}
      expert_config = {"experts": chosen, "shared_experts": shared, "non_expert_modules": non_expert}
      # Variants that train non-expert modules take FFT's learning rate, as the paper's FFT-like settings do.
      rate = lr["FFT"] if non_expert else lr[f"ESFT-{config['score'].title()}"]
      runner.run(task, variant, "esft", rate, expert_config)
    runner.run(task, "everything (FFT)", "fft", lr["FFT"])


def _random_experts(runner: _Runner, config: dict) -> None:
  lr = runner.ws.preset.lr[f"ESFT-{config['score'].title()}"]
  num_experts = runner.ws.base.config.num_experts
  for task in config["tasks"]:
    selection = select_experts(runner.ws.summaries[task], config["score"], config["p"])
    runner.run(task, f"scored ({config['score']} p={config['p']})", "esft", lr, selection, seed=None)
    for seed in config["seeds"]:
      runner.run(task, f"random seed {seed}", "esft", lr, random_like(selection, num_experts, seed), seed=seed)


_ABLATION_RUNS: dict[str, Callable[[_Runner, dict], None]] = {
    "threshold": _threshold, "what_to_train": _what_to_train, "random_experts": _random_experts}


def run_ablation(config_path: str | Path, out: Path, preset_name: str = "tiny", cache_root: Path | None = None,
                 log=print, preset=None) -> dict:
  """Runs (or resumes) one ablation in the demo workspace `out` (shared with `esft-jax demo --out`)."""
  config = load_ablation_config(config_path)
  preset = preset or PRESETS[preset_name]
  ws = prepare(out, preset, cache_root, log)
  runner = _Runner(ws, config["ablation"], log)
  base = ws.evaluate(ws.base.params, out / "runs" / "base_eval.json")
  _ABLATION_RUNS[config["ablation"]](runner, config)
  results = {"ablation": config["ablation"], "config": config, "preset": preset_name, "rows": runner.rows,
             "base": base, "top_k": ws.base.config.num_experts_per_tok, "num_experts": ws.base.config.num_experts}
  runner.root.mkdir(parents=True, exist_ok=True)
  atomic_write_text(runner.root / "results.json", json.dumps(results, indent=1))
  report = write_ablation_report(runner.root, results)
  log(f"wrote {report}")
  return results
