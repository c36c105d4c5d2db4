"""The paper's ablations on the demo's miniature: one config under configs/ablations/ per experiment.

Each ablation runs over seeds on the demo's workspaces (one per seed: its tasks, aligned base and routing scores;
the seed also orders the fine-tuning data) with the learning rates the demo's search chose, fine-tunes the
variants it compares on the tasks its config names, evaluates each on its task and on general ability, and writes
REPORT.md (mean ± std over seeds, each finding tested beyond the spread), results.json and figures into its own
folder. Runs and evaluations are cached per seed like the demo's, so an interrupted ablation resumes and a seed
already run is read back.

    threshold       Figure 6: task and general scores against the average trained experts per layer, token and
                    gate scores over a range of p, LoRA ranks beside them.
    what_to_train   Table 3: relevant experts only; + shared experts; + non-expert modules; shared only;
                    shared + non-expert; everything (FFT).
    random_experts  Table 4: the scored selection against as many experts per layer drawn at random (the seed
                    draws them).
    granularity_groups
                    Figure 7 (appendix B): the base's experts grouped G at a time by how often they are routed
                    together on general text, each group one coarse expert; ESFT (token and gate) on whole groups
                    and FFT against G, with the fine experts trained per layer.
    granularity_scratch
                    Beyond the paper: bases of equal total and active routed parameters, pretrained alike (each
                    seed pretrains each anew), from a few wide experts to many narrow ones, with and without a
                    shared expert; how concentrated their routing is, what ESFT selects, and task and general
                    scores against granularity.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from esft_jax.ablations.config import (AblationConfig, GranularityGroupsConfig, GranularityScratchConfig,
                                        RandomExpertsConfig, ThresholdConfig, WhatToTrainConfig, config_json,
                                        load_ablation_config)
from esft_jax.ablations.granularity import (cooccurrence, cosine_similarity, greedy_groups, grouped_model,
                                            scratch_spec)
from esft_jax.ablations.report import write_ablation_report
from esft_jax.analysis.routing import rank_shares
from esft_jax.demo.experiment import METHODS, PRESETS, SELECTION, reused_search, workspace_search
from esft_jax.demo.pretrain import BaseSpec, base_is_built, build_aligned, build_base
from esft_jax.demo.tasks import TASK_NAMES
from esft_jax.demo.workspace import (Job, Workspace, in_worker_processes, prepare, run_jobs,
                                     share_device_with_workers)
from esft_jax.esft.selection import random_like, select_experts, write_expert_config
from esft_jax.files import atomic_write_text
from esft_jax.interop.hf import save_hf_model

class _Runner:
  """Fine-tunes and evaluates named variants of one ablation on each of its tasks, for one seed's workspace:
  `run` queues a variant, `finish` runs the queue (in worker processes where the preset has them) and records a
  row per variant and task."""

  def __init__(self, ws: Workspace, root: Path, lr: dict, log, workers: int):  # root: OUT/ablations/NAME/seed-S
    self.ws, self.root, self.lr, self.log, self.workers = ws, root, lr, log, workers
    self.rows: list[dict] = []
    self.queue: list[tuple[Workspace, Job, dict]] = []

  def on(self, ws: Workspace) -> _Runner:
    """This runner on another base's workspace; queue, rows and folder shared."""
    other = copy.copy(self)
    other.ws = ws
    return other

  def expert_config(self, task: str, variant: str, config: dict) -> Path:
    path = self.root / "expert_configs" / f"{task}-{variant}.json"
    write_expert_config(path, config)
    return path

  def run(self, task: str, variant: str, kind: str, lr: float, expert_config: dict | None = None,
          lora_rank: int = 8, **fields) -> None:
    """Queues one variant on `task`; its row holds the seed, the variant's fields, trainable parameters, experts
    per layer, own-task score, general loss and general-benchmark score."""
    config_path = self.expert_config(task, variant, expert_config) if expert_config is not None else None
    job = Job(f"{variant} on {task} (seed {self.ws.seed})", task, kind, self.root / "runs" / f"{task}-{variant}", lr,
              config_path, lora_rank)
    row = {"seed": self.ws.seed, "task": task, "variant": variant, **fields,
           "experts_per_layer": _experts_per_layer(expert_config) if expert_config is not None else None}
    self.queue.append((self.ws, job, row))

  def finish(self) -> None:
    results = run_jobs([(ws, job) for ws, job, _ in self.queue], self.workers, self.log)
    for (ws, job, row), (summary, scores) in zip(self.queue, results):
      self.rows.append({**row, "trainable_params": summary["trainable_params"], "task_score": scores[job.task],
                        "general_loss": scores["general_loss"], "general_score": scores["general_score"]})
    self.queue.clear()

  def evaluate_base(self, ws: Workspace, name: str, tasks: tuple[str, ...]) -> dict:
    """`ws`'s base model on `tasks` and general ability, cached under a name that holds the tasks (a config whose
    tasks change evaluates anew)."""
    return ws.evaluate(ws.base.params, self.root / "runs" / f"{name}_eval-{'-'.join(tasks)}.json", tasks)


def _experts_per_layer(config: dict) -> float:
  return float(np.mean([len(ids) for ids in config["experts"].values()]))


def _threshold(runner: _Runner, config: ThresholdConfig) -> None:
  lr = runner.lr
  for task in config.tasks:
    for score, thresholds in (("token", config.token_p), ("gate", config.gate_p)):
      for p in thresholds:
        selection = select_experts(runner.ws.summaries[task], score, p)
        runner.run(task, f"{score}-p{p}", "esft", lr[f"ESFT-{score.title()}"], selection, score=score, p=p)
    for rank in config.lora_ranks:
      runner.run(task, f"lora-r{rank}", "lora", lr["LoRA"], lora_rank=rank, score="lora", rank=rank)


WHAT_TO_TRAIN = (  # the paper's Table 3: (variant, trains the selected experts, shared experts, non-expert modules)
    ("relevant experts", True, False, False),
    ("+ shared experts", True, True, False),
    ("+ shared + non-expert", True, True, True),
    ("shared experts only", False, True, False),
    ("shared + non-expert", False, True, True),
)


def _what_to_train(runner: _Runner, config: WhatToTrainConfig) -> None:
  lr = runner.lr
  for task in config.tasks:
    selection = select_experts(runner.ws.summaries[task], config.score, config.p)
    for variant, experts, shared, non_expert in WHAT_TO_TRAIN:
      chosen = selection["experts"] if experts else {layer: [] for layer in selection["experts"]}
      expert_config = {"experts": chosen, "shared_experts": shared, "non_expert_modules": non_expert}
      # Variants that train non-expert modules take FFT's learning rate, as the paper's FFT-like settings do.
      rate = lr["FFT"] if non_expert else lr[f"ESFT-{config.score.title()}"]
      runner.run(task, variant, "esft", rate, expert_config)
    runner.run(task, "everything (FFT)", "fft", lr["FFT"])


def _random_experts(runner: _Runner, config: RandomExpertsConfig) -> None:
  """The scored selection and, drawn with the run's seed, as many experts per layer at random."""
  lr = runner.lr[f"ESFT-{config.score.title()}"]
  num_experts = runner.ws.base.config.num_experts
  for task in config.tasks:
    selection = select_experts(runner.ws.summaries[task], config.score, config.p)
    runner.run(task, "scored", "esft", lr, selection)
    runner.run(task, "random", "esft", lr, random_like(selection, num_experts, runner.ws.seed))


def _esft_and_fft(runner: _Runner, task: str, prefix: str, **fields) -> None:
  """ESFT-Token and ESFT-Gate at the demo's p, and FFT, on the runner's base; `fields` go in every row."""
  lr = runner.lr
  config = runner.ws.base.config
  group = config.router_group_size
  for method, (score, p) in SELECTION.items():
    selection = select_experts(runner.ws.summaries[task], score, p)
    chosen = _experts_per_layer(selection)
    runner.run(task, f"{prefix} {method}", "esft", lr[method], selection, method=method,
               fine_experts_per_layer=chosen * group, selected_fraction=chosen / config.num_experts, **fields)
  runner.run(task, f"{prefix} FFT", "fft", lr["FFT"], method="FFT",
             fine_experts_per_layer=float(config.num_experts * group), selected_fraction=1.0, **fields)


def _granularity_groups(runner: _Runner, config: GranularityGroupsConfig) -> dict:
  ws = runner.ws
  counts_path = runner.root / "cooccurrence.json"
  if not counts_path.exists():
    runner.log(f"routing held-out general text for the expert co-occurrence (seed {ws.seed})")
    counts = cooccurrence(ws.base.config, ws.base.params, ws.held_out, ws.preset.eval_batch, ws.dtype)
    runner.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(counts_path, json.dumps(counts.tolist()))
  counts_NxExE = np.asarray(json.loads(counts_path.read_text()))
  layers = ws.base.config.moe_layer_ids
  similarity = {layer: cosine_similarity(c) for layer, c in zip(layers, counts_NxExE)}
  bases, groups, cohesion, gate_mass = {}, {}, {}, {}
  active = config.active_experts or ws.base.config.num_experts_per_tok
  for size in config.group_sizes:
    groups[size] = {layer: greedy_groups(similarity[layer], size) for layer in layers}
    cohesion[str(size)] = _mean_group_similarity(similarity, groups[size])
    if size == 1 and active == ws.base.config.num_experts_per_tok:
      group_ws, base_name = ws, "base"  # singleton groups: the base itself, with the workspace's scores
    else:
      base_dir = runner.root / "bases" / f"group{size}-active{active}"
      if not (base_dir / "config.json").exists():
        coarse = grouped_model(ws.base.config, ws.base.params, ws.base.hf_config, groups[size], active)
        work = base_dir.with_name(base_dir.name + ".building")
        save_hf_model(work, *coarse, tokenizer_dir=ws.base_dir)
        work.rename(base_dir)
      group_ws = ws.for_base(base_dir, runner.root / "scores" / base_dir.name, config.tasks, runner.log)
      base_name = f"base-{base_dir.name}"
    # A token's summed gate weights, mean over layers and tasks: what ESFT-Gate's p is a share of.
    gate_mass[str(size)] = float(np.mean([_gate_table(group_ws.summaries[t]).sum(axis=1).mean()
                                          for t in config.tasks]))
    bases[str(size)] = runner.evaluate_base(group_ws, base_name, config.tasks)
    for task in config.tasks:
      _esft_and_fft(runner.on(group_ws), task, f"G={size}", group_size=size,
                    routed_experts=ws.base.config.num_experts // size)
  pairs = [float(m[np.triu_indices(len(m), 1)].mean()) for m in similarity.values()]
  return {"bases": bases, "active_experts": active,
          "groups": {str(size): {str(layer): g for layer, g in by_layer.items()} for size, by_layer in groups.items()},
          "group_similarity": cohesion, "pair_similarity": float(np.mean(pairs)), "gate_mass": gate_mass}


def pretrain_bases(specs: list[BaseSpec], cache_root: Path, workers: int, log) -> None:
  """Pretrains the bases of `specs` not yet cached under `cache_root`, `workers` at a time in worker processes
  (one small base leaves most of a GPU idle); with one worker, `build_base` pretrains each when first asked."""
  unbuilt = list({spec.key(): spec for spec in specs if not base_is_built(spec, cache_root)}.values())
  if workers > 1 and len(unbuilt) > 1:
    log(f"pretraining {len(unbuilt)} bases, {min(workers, len(unbuilt))} at a time")
    in_worker_processes([(build_base, (spec, cache_root, _quiet)) for spec in unbuilt], workers,
                        lambda i, result: log(f"pretrained {result[0]}"))


def _quiet(_: str) -> None:
  """A worker's log: its parent reports what finished."""


def _mean_group_similarity(similarity: dict, groups: dict) -> float | None:
  """Mean pairwise similarity within the groups, over groups and layers (None for singletons)."""
  means = [similarity[layer][np.ix_(g, g)][np.triu_indices(len(g), 1)].mean()
           for layer, layer_groups in groups.items() for g in layer_groups if len(g) > 1]
  return float(np.mean(means)) if means else None


def scratch_name(spec: BaseSpec, shared_width: int) -> str:
  return f"E{spec.routed_experts}-k{spec.experts_per_token}-shared{shared_width}"


def _granularity_scratch(runner: _Runner, config: GranularityScratchConfig) -> dict:
  ws = runner.ws
  # Every base is pretrained like the workspace's own (same text and steps), with the run's seed: each seed is
  # another pretraining of each base (seed 0 is the demo's own). Cached beside the workspace's base.
  specs = [dataclasses.replace(scratch_spec(ws.preset.base, v.experts, v.shared_width), seed=ws.seed)
           for v in config.variants]
  cache_root = ws.base_dir.parent
  pretrain_bases(specs, cache_root, runner.workers, runner.log)
  bases = {}
  for variant, spec in zip(config.variants, specs):
    name = scratch_name(spec, variant.shared_width)
    base_dir = build_aligned(spec, ws.preset.align, ws.alignment, ws.seed, cache_root, runner.log)
    variant_ws = ws.for_base(base_dir, runner.root / "scores" / name, config.tasks, runner.log)
    top_k = variant_ws.base.config.num_experts_per_tok
    # Top-k share: the part of the task's gate mass on its k busiest experts, mean over layers (k/E = uniform).
    concentration = {task: float(rank_shares(_gate_table(variant_ws.summaries[task]))[:, :top_k].sum(axis=1).mean())
                     for task in config.tasks}
    fields = dict(experts=spec.routed_experts, top_k=top_k, width=spec.expert_width,
                  shared_width=variant.shared_width)
    bases[name] = {**fields, "concentration": concentration,
                   **runner.evaluate_base(variant_ws, f"base-{name}", config.tasks)}
    for task in config.tasks:
      _esft_and_fft(runner.on(variant_ws), task, name, concentration=concentration[task], **fields)
  return {"bases": bases}


def _gate_table(summary: dict) -> np.ndarray:
  """[N, E] gate scores of a routing summary (layer and expert keys in numeric order)."""
  table = summary["gate_scores"]
  return np.array([[table[layer][e] for e in sorted(table[layer], key=int)] for layer in sorted(table, key=int)])


_ABLATION_RUNS: dict[str, Callable[[_Runner, AblationConfig], dict | None]] = {
    "threshold": _threshold, "what_to_train": _what_to_train, "random_experts": _random_experts,
    "granularity_groups": _granularity_groups, "granularity_scratch": _granularity_scratch}


def check_fits_preset(config: AblationConfig, path: str | Path, preset) -> None:
  """Before anything runs, so a config written for another preset fails at once: a scratch variant must split the
  preset's routed width evenly, and groups of G keep A/G groups active (A active experts, default the preset's
  top-k), so G must divide the preset's E and A."""
  if isinstance(config, GranularityScratchConfig):
    for variant in config.variants:
      try:
        scratch_spec(preset.base, variant.experts, variant.shared_width)
      except ValueError as e:
        raise ValueError(f"{path}: {e} (configs/ablations/granularity_scratch.json fits the tiny preset, "
                         "granularity_scratch_small.json the small one)") from None
  if not isinstance(config, GranularityGroupsConfig):
    return
  e = preset.base.routed_experts
  a = config.active_experts or preset.base.experts_per_token
  if a > e:
    raise ValueError(f"{path}: 'active_experts' is {a}, more than this preset's {e} routed experts")
  bad = [g for g in config.group_sizes if e % g or a % g]
  if bad:
    fits = [g for g in range(1, a + 1) if e % g == 0 and a % g == 0]
    raise ValueError(f"{path}: group sizes {bad} do not divide this preset's {e} routed experts and the {a} active "
                     f"per token; use sizes from {fits}, or set 'active_experts' (as "
                     "configs/ablations/granularity_groups_small.json does for the small preset)")


def run_ablation(config_path: str | Path, out: Path, preset_name: str = "tiny", cache_root: Path | None = None,
                 log=print, preset=None, workers: int | None = None, seeds: tuple[int, ...] | None = None,
                 lr_search_from: Path | None = None) -> dict:
  """Runs (or resumes) one ablation over `seeds` (default: the preset's) in the demo workspace `out` (shared with
  `esft-jax demo --out`), at the learning rates of the workspace's search, of `lr_search_from` (an earlier demo's
  lr_search.json) where it has none, else of a search run here. `workers` (default: the preset's) > 1 runs that
  many fine-tune-and-evaluate jobs at once, as the demo does."""
  config = load_ablation_config(config_path)
  preset = preset or PRESETS[preset_name]
  check_fits_preset(config, config_path, preset)
  seeds = tuple(seeds or preset.seeds)
  repeated = sorted({s for s in seeds if seeds.count(s) > 1})
  if repeated:
    raise ValueError(f"seeds {list(seeds)} name seed {repeated[0]} more than once; list each seed once")
  reused = reused_search(lr_search_from, METHODS, preset_name, preset) if lr_search_from else None
  workers = workers or preset.workers
  share_device_with_workers(workers)
  started = time.time()
  # Its folder is named after the config file: two configs of one ablation (granularity_groups and
  # granularity_groups_small, say) keep their runs and reports apart in one workspace.
  root = out / "ablations" / Path(config_path).stem
  resumed_runs = sum(1 for _ in root.glob("seed-*/runs/*/eval.json"))
  per_seed, search = {}, None
  # The workspaces hold the ablation's tasks and the learning-rate search's (so a search run from here is the
  # demo's), not all six: each seed scores routing only where it is used.
  task_names = tuple(t for t in TASK_NAMES if t in config.tasks or t in preset.search_tasks)
  for seed in seeds:
    ws = prepare(out, preset, seed, cache_root, log, task_names)
    if search is None:  # the demo's learning-rate search, shared through the workspace
      search = workspace_search(ws, METHODS, workers, log, reused)
    runner = _Runner(ws, root / f"seed-{seed}", search["chosen"], log, workers)
    base = runner.evaluate_base(ws, "base", config.tasks)
    extra = _ABLATION_RUNS[config.ablation](runner, config) or {}
    runner.finish()
    per_seed[str(seed)] = {"rows": runner.rows, "base": base, **extra}
  results = {"ablation": config.ablation, "config": config_json(config), "config_file": Path(config_path).name,
             "preset": preset_name, "seeds": list(seeds), "tasks": list(config.tasks), "lr": search["chosen"],
             "lr_search_from": search.get("reused_from"),
             "per_seed": per_seed, "top_k": ws.base.config.num_experts_per_tok,
             "num_experts": ws.base.config.num_experts, "wall_seconds": time.time() - started,
             "resumed_runs": resumed_runs}
  root.mkdir(parents=True, exist_ok=True)
  report = write_ablation_report(root, results)  # adds the findings and writes results.json beside REPORT.md
  log(f"wrote {report}")
  return results
