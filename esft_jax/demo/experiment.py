"""`esft-jax demo`: the paper's experiment in miniature, end to end, offline, following its protocol (section 3.1).

Per seed (the seed draws the tasks, the alignment data and the fine-tuning data order):
1. Six generated tasks (two enhancement, four adaptation) and four general instruction families.
2. The base model in the paper's two stages: pretrained (once, cached) on general text and the enhancement tasks'
   examples, then aligned on the general families, which exclude math and code (`esft_jax.demo.pretrain`).
3. Routing scores per task on the aligned base (the official log format), Figures 2 and 3, expert selection
   (token p=0.2, gate p=0.1) and Figure 4.
4. A learning-rate search per method on one grid, in the mixed setting on the preset's search tasks, picked by
   validation loss on a split of the training data (first seed; the others reuse its choice).
5. FFT, LoRA, ESFT-Token and ESFT-Gate on every task, with the task's data mixed 1:1 with alignment data (Table 1)
   and, where the preset asks, unmixed (Tables 9 and 10); the best validation checkpoint of each run is kept.
6. Every model on its own task's test split, on the general families' test splits and on held-out general text;
   REPORT.md (the findings tested beyond the spread over seeds), results.json and figures.

Every stage is cached under the output directory, so an interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from esft_jax.analysis.figures import plot_routing_figures, plot_selected_experts
from esft_jax.analysis.routing import routing_figures_from_logs
from esft_jax.demo.pretrain import AlignSpec, BaseSpec
from esft_jax.demo.report import write_report
from esft_jax.demo.tasks import TASK_NAMES
from esft_jax.demo.workspace import (DemoPreset, Job, Workspace, cached_json, prepare, run_jobs,
                                     share_device_with_workers)
from esft_jax.esft.selection import select_experts, write_expert_config
from esft_jax.esft.trainable import count_parameters
from esft_jax.train.metrics import validation_losses

METHODS = ("FFT", "LoRA", "ESFT-Token", "ESFT-Gate")
KINDS = {"FFT": "fft", "LoRA": "lora", "ESFT-Token": "esft", "ESFT-Gate": "esft"}
SELECTION = {"ESFT-Token": ("token", 0.2), "ESFT-Gate": ("gate", 0.1)}

PRESETS = {
    "tiny": DemoPreset(
        base=BaseSpec(vocab_size=2048, hidden_size=128, num_layers=4, num_heads=4, routed_experts=16,
                      experts_per_token=4, shared_experts=1, expert_width=64, dense_width=256, kv_lora_rank=32,
                      seq_length=128, general_chars=300_000, held_out_chars=20_000, enhancement_examples=200,
                      steps=300, batch_size=16, lr=3e-3),
        align=AlignSpec(examples_per_family=300, steps=200, batch_size=16, lr=1e-3),
        n_train=400, n_test=24, n_general_test=24, score_tokens=6_000, finetune_steps=40, finetune_batch=8,
        finetune_seq_length=128, lr_grid=(3e-4, 1e-3, 3e-3, 1e-2), search_tasks=("math", "intent"),
        settings=("mixed",), seeds=(0,), max_new_tokens=48, eval_batch=24),
    # Experts computed densely ("reference"): at 64 experts of width 128 that is ~11x the routed FLOPs but a few
    # ms per step on an H200, while each of the jobs' steps would otherwise compile its own Mosaic GPU kernels.
    "small": DemoPreset(
        base=BaseSpec(vocab_size=8192, hidden_size=512, num_layers=8, num_heads=8, routed_experts=64,
                      experts_per_token=6, shared_experts=2, expert_width=128, dense_width=1408, kv_lora_rank=128,
                      seq_length=512, general_chars=6_000_000, held_out_chars=60_000, enhancement_examples=1000,
                      steps=1500, batch_size=32, lr=1.5e-3, compute_dtype="bfloat16", expert_impl="reference"),
        # The paper's vanilla model is a finished chat model: the alignment runs past its validation optimum and
        # keeps the best of its ten evaluations (the report shows the curve).
        align=AlignSpec(examples_per_family=1000, steps=1200, batch_size=32, lr=1e-3),
        n_train=2000, n_test=100, n_general_test=50, score_tokens=8_192, finetune_steps=200, finetune_batch=16,
        finetune_seq_length=512, lr_grid=(1e-4, 3e-4, 1e-3, 3e-3), search_tasks=("math", "intent"),
        settings=("mixed", "unmixed"), seeds=(0, 1, 2), max_new_tokens=64, eval_batch=50, workers=4),
}


def _run_dir(ws: Workspace, task: str, method: str, setting: str, lr: float) -> Path:
  return ws.dir / "runs" / f"{task}-{method}-{setting}-lr{lr:g}"


def _job(ws: Workspace, task: str, method: str, setting: str, lr: float, evaluate: bool = True) -> Job:
  kind = KINDS[method]
  expert_config = ws.dir / "scores" / task / f"experts_{SELECTION[method][0]}.json" if kind == "esft" else None
  return Job(f"{method} on {task} ({setting}, lr {lr:g}, seed {ws.seed})", task, kind,
             _run_dir(ws, task, method, setting, lr), lr, expert_config, setting=setting, evaluate=evaluate)


def _select(ws: Workspace) -> dict:
  """Each task's expert configs for ESFT-Token and ESFT-Gate, written beside its scores."""
  selections = {}
  for name in ws.tasks:
    for score_kind, p in SELECTION.values():
      config = select_experts(ws.summaries[name], score_kind, p)
      write_expert_config(ws.dir / "scores" / name / f"experts_{score_kind}.json", config)
      selections[(name, score_kind)] = config
  return selections


def search_learning_rates(ws: Workspace, methods: tuple[str, ...], workers: int, log) -> dict:
  """Each method's rate from the preset's grid: the lowest mean best-validation loss over the search tasks in the
  mixed setting. Every point is kept, cached in the workspace."""
  preset = ws.preset
  _select(ws)  # the ESFT runs' expert configs
  tasks = [t for t in preset.search_tasks if t in ws.tasks] or list(ws.tasks)[:1]
  points = [(m, lr, t) for m in methods for lr in preset.lr_grid for t in tasks]
  log(f"learning-rate search: {len(points)} runs ({len(methods)} methods x {len(preset.lr_grid)} rates x "
      f"tasks {tasks})")
  summaries = run_jobs([(ws, _job(ws, t, m, "mixed", lr, evaluate=False)) for m, lr, t in points], workers, log)
  val_loss = {m: {f"{lr:g}": {} for lr in preset.lr_grid} for m in methods}
  for (m, lr, t), (summary, _) in zip(points, summaries):
    val_loss[m][f"{lr:g}"][t] = summary["best_val_loss"]
  mean = {m: {lr: sum(by_task.values()) / len(by_task) for lr, by_task in rates.items()}
          for m, rates in val_loss.items()}
  chosen = {m: float(min(rates, key=rates.get)) for m, rates in mean.items()}
  return {"grid": list(preset.lr_grid), "tasks": tasks, "setting": "mixed", "seed": ws.seed,
          "val_loss": val_loss, "mean_val_loss": mean, "chosen": chosen}


def reused_search(path: Path, methods: tuple[str, ...], preset_name: str, preset: DemoPreset) -> dict:
  """An earlier run's learning-rate search (its OUT/lr_search.json), checked to name a rate for every method and
  to have searched `preset`'s grid: another preset's rates do not carry over."""
  try:
    search = json.loads(Path(path).read_text())
  except (OSError, ValueError) as e:
    raise ValueError(f"--lr-search {path}: cannot read it as an earlier demo's lr_search.json ({e})") from e
  missing = [m for m in methods if m not in search.get("chosen", {})]
  if missing or not all(k in search for k in ("grid", "tasks", "seed", "mean_val_loss")):
    raise ValueError(f"--lr-search {path}: not a complete learning-rate search (no chosen rate for {missing or '-'}, "
                     "or no grid, tasks, seed or mean_val_loss); pass the lr_search.json an earlier `esft-jax demo` "
                     "wrote in its OUT, or leave --lr-search out to search here")
  if [float(lr) for lr in search["grid"]] != [float(lr) for lr in preset.lr_grid]:
    raise ValueError(f"--lr-search {path}: its grid {search['grid']} is not preset {preset_name}'s "
                     f"{list(preset.lr_grid)}; pass a search an `esft-jax demo --preset {preset_name}` ran")
  return {**search, "reused_from": str(path)}


def workspace_search(ws: Workspace, methods: tuple[str, ...], workers: int, log, reused: dict | None) -> dict:
  """The learning-rate search of the workspace `ws.out` (its lr_search.json): the one already there, else
  `reused` (from `reused_search`), else a search run now. Refuses a workspace holding other rates than `reused`."""
  path = ws.out / "lr_search.json"
  search = cached_json(path, lambda: reused or search_learning_rates(ws, methods, workers, log))
  if reused and search["chosen"] != reused["chosen"]:
    raise ValueError(f"{path} holds other learning rates than --lr-search {reused['reused_from']}; use another "
                     "--out, or leave --lr-search out to continue with the rates already there")
  log("learning rates: " + ", ".join(f"{m} {lr:g}" for m, lr in search["chosen"].items()))
  return search


def _seed_results(ws: Workspace, methods: tuple[str, ...], lr: dict, workers: int, log) -> dict:
  """Routing, selections, the base's evaluation and every (setting, task, method) run of one seed."""
  figures_dir = ws.dir / "figures"
  figures_dir.mkdir(parents=True, exist_ok=True)
  routing = routing_figures_from_logs({name: ws.dir / "scores" / name for name in ws.tasks}, out_dir=figures_dir,
                                      top_k=ws.base.config.num_experts_per_tok)
  plot_routing_figures(routing, figures_dir)
  selections = _select(ws)
  plot_selected_experts(selections, figures_dir / "figure4_selected_experts.png")
  log(f"evaluating the aligned base model (seed {ws.seed})")
  base = ws.evaluate(ws.base.params, ws.dir / "runs" / "base_eval.json")
  keys = [(s, t, m) for s in ws.preset.settings for t in ws.tasks for m in methods]
  outcomes = run_jobs([(ws, _job(ws, t, m, s, lr[m])) for s, t, m in keys], workers, log)
  runs: dict = {}
  for (s, t, m), (summary, scores) in zip(keys, outcomes):
    runs.setdefault(s, {}).setdefault(t, {})[m] = {**summary, "scores": scores, "lr": lr[m]}
  alignment = validation_losses(ws.base_dir / "training" / "metrics.jsonl")
  return {"base": base, "alignment_val_loss": alignment, "runs": runs, "routing": routing,
          "selected_experts": {f"{t}-{kind}": {l: len(ids) for l, ids in c["experts"].items()}
                               for (t, kind), c in selections.items()},
          "selected_per_layer": {f"{t}-{kind}": float(np.mean([len(ids) for ids in c["experts"].values()]))
                                 for (t, kind), c in selections.items()},
          "selected_share": {f"{t}-{kind}": _selected_share(ws.summaries[t][f"{kind}_scores"], c)
                             for (t, kind), c in selections.items()}}


def _selected_share(scores_by_layer: dict, config: dict) -> float:
  """The selected experts' share of the layer's total score, mean over layers: how much of the task's routing the
  trained experts carry."""
  return float(np.mean([sum(scores[str(e)] for e in config["experts"][layer]) / sum(scores.values())
                        for layer, scores in scores_by_layer.items()]))


def run_demo(out: Path, preset_name: str = "tiny", cache_root: Path | None = None, log=print,
             task_names: tuple[str, ...] = TASK_NAMES, methods: tuple[str, ...] = METHODS,
             preset: DemoPreset | None = None, workers: int | None = None,
             seeds: tuple[int, ...] | None = None, settings: tuple[str, ...] | None = None,
             lr_search_from: Path | None = None) -> dict:
  """Runs (or resumes) the whole demo into `out`. `seeds` (default: the preset's) are run in order, the first
  one's learning-rate search serving all. `settings` (default: the preset's) are the data settings fine-tuned.
  `lr_search_from`: an earlier run's lr_search.json, whose chosen rates are reused instead of searching.
  `task_names`, `methods` and `preset` narrow it for tests. `workers`
  (default: the preset's) > 1 runs that many fine-tune-and-evaluate jobs at once in worker processes."""
  preset = preset or PRESETS[preset_name]
  if settings:
    preset = dataclasses.replace(preset, settings=tuple(settings))
  seeds = tuple(seeds or preset.seeds)
  reused = reused_search(lr_search_from, methods, preset_name, preset) if lr_search_from else None
  workers = workers or preset.workers
  share_device_with_workers(workers)
  started = time.time()
  per_seed, lr_search, base_parameters, top_k = {}, None, None, None
  resumed_runs = sum(1 for _ in out.glob("seed-*/runs/*/eval.json"))
  for seed in seeds:
    ws = prepare(out, preset, seed, cache_root, log, task_names)
    if lr_search is None:
      lr_search = workspace_search(ws, methods, workers, log, reused)
    per_seed[str(seed)] = _seed_results(ws, methods, lr_search["chosen"], workers, log)
    base_parameters, top_k = count_parameters(ws.base.params), ws.base.config.num_experts_per_tok
  results = {"preset": preset_name, "seeds": list(seeds), "tasks": list(task_names), "methods": list(methods),
             "settings": list(preset.settings), "general_tasks": list(ws.general), "lr_search": lr_search,
             "alignment": dataclasses.asdict(preset.align),
             "per_seed": per_seed, "base_parameters": base_parameters, "top_k": top_k,
             "wall_seconds": time.time() - started, "resumed_runs": resumed_runs}
  write_report(out, results)  # adds the findings to `results` and writes results.json beside REPORT.md
  log(f"wrote {out / 'REPORT.md'}")
  return results
