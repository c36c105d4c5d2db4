"""`esft-jax demo`: the paper's experiment in miniature, end to end, offline.

1. Six generated tasks (train/test JSONL) and a general corpus from the Python standard library.
2. A small DeepSeekMoE-style base, pretrained once and cached.
3. Routing scores per task (the official log format, so the figures use the same code as for real logs),
   Figures 2 and 3, then expert selection (token p=0.2, gate p=0.1) and Figure 4.
4. FFT, LoRA, ESFT-Token and ESFT-Gate on every task, same data and steps.
5. Every model on every task's test split and on held-out general text; REPORT.md, results.json, figures.

Each finished unit (base model, scores, run, evaluation) is cached under the output directory, so an
interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from esft_jax.analysis.figures import plot_routing_figures, plot_selected_experts
from esft_jax.analysis.routing import routing_figures_from_logs
from esft_jax.data.jsonl import read_jsonl
from esft_jax.data.pipeline import DataConfig, format_records
from esft_jax.data.sources import open_examples
from esft_jax.demo.pretrain import BaseSpec, build_base, text_example
from esft_jax.demo.report import write_report
from esft_jax.demo.tasks import TASK_NAMES, make_all_tasks
from esft_jax.esft.routing_pass import sample_until, score_examples
from esft_jax.esft.selection import select_experts, write_expert_config
from esft_jax.esft.trainable import count_parameters
from esft_jax.evaluate.runner import evaluate_generation, heldout_loss, prompt_ids
from esft_jax.files import atomic_write_text
from esft_jax.generate import bucket
from esft_jax.interop.adapter import load_adapter
from esft_jax.interop.hf import load_hf_model
from esft_jax.interop.tokenizer import load_tokenizer
from esft_jax.train.run import finetune
from esft_jax.train.trainer import TrainConfig

METHODS = ("FFT", "LoRA", "ESFT-Token", "ESFT-Gate")
SELECTION = {"ESFT-Token": ("token", 0.2), "ESFT-Gate": ("gate", 0.1)}


@dataclasses.dataclass(frozen=True)
class DemoPreset:
  base: BaseSpec
  n_train: int
  n_test: int
  score_tokens: int
  finetune_steps: int
  finetune_batch: int
  finetune_seq_length: int
  # method -> learning rate. The paper uses 1e-5 for every method over 500 steps; a short run on a tiny model
  # needs more, and ESFT, which trains ~7% of the parameters, more than FFT (measured on the tiny preset: ESFT at
  # 3e-3 for 40 steps scores as well as at 1e-3 for 60; at 1e-2 it loses general ability).
  lr: dict
  max_new_tokens: int
  eval_batch: int
  workers: int = 1  # fine-tune-and-evaluate jobs at once (see `run_jobs`)


PRESETS = {
    "tiny": DemoPreset(
        base=BaseSpec(vocab_size=2048, hidden_size=128, num_layers=4, num_heads=4, routed_experts=16,
                      experts_per_token=4, shared_experts=1, expert_width=64, dense_width=256, kv_lora_rank=32,
                      seq_length=128, general_chars=300_000, held_out_chars=20_000, format_examples_per_task=60,
                      steps=300, batch_size=16, lr=3e-3),
        n_train=400, n_test=24, score_tokens=6_000, finetune_steps=40, finetune_batch=8, finetune_seq_length=128,
        lr={"FFT": 3e-4, "LoRA": 1e-3, "ESFT-Token": 3e-3, "ESFT-Gate": 3e-3}, max_new_tokens=48, eval_batch=24),
    # Experts computed densely ("reference"): at 64 experts of width 128 that is ~11x the routed FLOPs but a few
    # ms per step on an H200, while each of the 24 jobs' steps would otherwise compile its own Mosaic GPU kernels
    # (an earlier try on the kernels had finished 0 of 24 jobs after 540 s).
    "small": DemoPreset(
        base=BaseSpec(vocab_size=8192, hidden_size=512, num_layers=8, num_heads=8, routed_experts=64,
                      experts_per_token=6, shared_experts=2, expert_width=128, dense_width=1408, kv_lora_rank=128,
                      seq_length=512, general_chars=6_000_000, held_out_chars=60_000, format_examples_per_task=300,
                      steps=1500, batch_size=32, lr=1.5e-3, compute_dtype="bfloat16", expert_impl="reference"),
        n_train=2000, n_test=100, score_tokens=8_192, finetune_steps=200, finetune_batch=16,
        finetune_seq_length=512, lr={"FFT": 1e-4, "LoRA": 5e-4, "ESFT-Token": 1e-3, "ESFT-Gate": 1e-3},
        max_new_tokens=64, eval_batch=50, workers=4),
}


def _write_jsonl(path: Path, records: list[dict]) -> Path:
  atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
  return path


def _cached_json(path: Path, compute):
  if path.exists():
    return json.loads(path.read_text())
  value = compute()
  path.parent.mkdir(parents=True, exist_ok=True)
  atomic_write_text(path, json.dumps(value, ensure_ascii=False, indent=1))
  return value


def _dir_bytes(path: Path) -> int:
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@dataclasses.dataclass(frozen=True)
class Job:
  """One fine-tuning run on a task's train split, then its evaluation: what `run_jobs` runs."""
  label: str  # for the log, e.g. "ESFT-Token on math"
  task: str
  kind: str  # fft | lora | esft
  run_dir: Path
  lr: float
  expert_config: Path | None = None
  lora_rank: int = 8


@dataclasses.dataclass
class Workspace:
  """What every experiment on the miniature shares: the generated tasks (written under `out/data`), the cached
  pretrained base, its tokenizer, the held-out general text and each task's routing scores (`out/scores`).
  Fine-tuning and evaluation results are cached as JSON next to their run, so every stage resumes."""
  out: Path
  preset: DemoPreset
  cache_root: Path
  tasks: dict
  base_dir: Path
  base: Any  # LoadedModel
  tokenizer: Any
  summaries: dict  # task -> routing summary (ESFT's scores)
  held_out_texts: list
  # `for_base`'s arguments when this workspace is on another base: how a worker process rebuilds it.
  other_base: tuple | None = None

  @functools.cached_property
  def held_out(self) -> list:
    """The held-out general texts as samples of this workspace's tokenizer."""
    return [text_example(self.tokenizer, t, f"held-out:{i}") for i, t in enumerate(self.held_out_texts)]

  @property
  def data(self) -> Path:
    return self.out / "data"

  @property
  def dtype(self):
    return jnp.dtype(self.preset.base.compute_dtype)

  def fine_tune(self, task: str, kind: str, run_dir: Path, lr: float, expert_config: Path | None = None,
                lora_rank: int = 8) -> dict:
    """One fine-tuning run (kind fft, lora or esft) on the task's train split; its summary, cached."""
    def compute():
      preset = self.preset
      train_cfg = TrainConfig(steps=preset.finetune_steps, lr=lr, eval_every=max(1, preset.finetune_steps // 2),
                              save_every=preset.finetune_steps, log_every=10,
                              compute_dtype=preset.base.compute_dtype, expert_impl=preset.base.expert_impl)
      data_cfg = DataConfig(seq_length=preset.finetune_seq_length, validation_fraction=0.05)
      result = finetune(self.base_dir, str(self.data / f"{task}_train.jsonl"), kind, run_dir, train_cfg, data_cfg,
                        preset.finetune_batch, expert_config, resume=True, lora_rank=lora_rank,
                        param_dtype="float32")
      return {"trainable_params": result.trainable_params, "optimizer_state_bytes": result.optimizer_state_bytes,
              "seconds": result.wall_seconds, "best_val_loss": result.best_val_loss,
              "step_peak_bytes": result.step_peak_bytes, "adapter_bytes": _dir_bytes(run_dir / "adapter")}

    return _cached_json(run_dir / "summary.json", compute)

  @functools.cached_property
  def test_items(self) -> dict[str, list]:
    return {name: read_jsonl(self.data / f"{name}_test.jsonl") for name in self.tasks}

  @functools.cached_property
  def prompt_length(self) -> int:
    """Every task's test prompts are padded to this one length, so all evaluations of a workspace compile
    generation once."""
    return bucket(max(len(prompt_ids(self.tokenizer, item.prompt))
                      for items in self.test_items.values() for item in items))

  def evaluate(self, params, cache_file: Path) -> dict:
    """Every task's test score and the held-out general loss of `params`, cached."""
    return _cached_json(cache_file, lambda: self._scores(params))

  def _scores(self, params) -> dict:
    scores = {}
    for name, task in self.tasks.items():
      result = evaluate_generation(self.base.config, params, self.tokenizer, self.test_items[name], task.metric,
                                   self.preset.max_new_tokens, self.preset.eval_batch, self.dtype,
                                   prompt_length=self.prompt_length, expert_impl=self.preset.base.expert_impl)
      scores[name] = result["mean"]
    scores["general_loss"] = heldout_loss(self.base.config, params, self.held_out, self.preset.eval_batch,
                                          self.dtype, self.preset.base.expert_impl)["mean"]
    return scores

  def evaluate_run(self, run_dir: Path) -> dict:
    """`evaluate` of the run's adapter, loaded only when its scores are not cached yet."""
    return _cached_json(run_dir / "eval.json",
                        lambda: self._scores(load_adapter(run_dir / "adapter", self.base.config, self.base.params)))

  def run_job(self, job: Job) -> tuple[dict, dict, str]:
    """The run's summary, its scores, and a line on where its time went."""
    started = time.time()
    summary = self.fine_tune(job.task, job.kind, job.run_dir, job.lr, job.expert_config, job.lora_rank)
    tuned = time.time()
    scores = self.evaluate_run(job.run_dir)
    return summary, scores, f"fine-tuned in {tuned - started:.0f} s, evaluated in {time.time() - tuned:.0f} s"

  def for_base(self, base_dir: Path, scores_root: Path, task_names: Sequence[str], log=print) -> Workspace:
    """The same tasks, data and held-out general text on another base model (with its own tokenizer), scored on
    `task_names` under `scores_root`: the granularity ablations fine-tune and evaluate grouped bases and bases of
    other shapes through the same code as the demo's own."""
    tokenizer = load_tokenizer(base_dir)
    base = load_hf_model(base_dir)
    summaries = _score_tasks(base, tokenizer, self.data, task_names, scores_root, self.preset, log)
    return dataclasses.replace(self, base_dir=base_dir, base=base, tokenizer=tokenizer, summaries=summaries,
                               other_base=(base_dir, scores_root, tuple(task_names)))


def _score_tasks(base, tokenizer, data: Path, task_names: Sequence[str], scores_root: Path,
                 preset: DemoPreset, log=print) -> dict:
  """Each task's routing summary on `base` (cached), with the official routing logs beside it."""
  summaries = {}
  for name in task_names:
    task_dir = scores_root / name

    def score(name=name, task_dir=task_dir):
      log(f"scoring routing on {name}")
      examples = format_records(open_examples(data / f"{name}_train.jsonl"), tokenizer)
      chosen = sample_until(examples, preset.score_tokens)
      return score_examples(base.config, base.params, chosen, batch_size=16, log_dir=task_dir,
                            dtype=jnp.dtype(preset.base.compute_dtype), expert_impl=preset.base.expert_impl)

    task_dir.mkdir(parents=True, exist_ok=True)
    summaries[name] = _cached_json(task_dir / "summary.json", score)
  return summaries


def prepare(out: Path, preset: DemoPreset, cache_root: Path | None = None, log=print,
            task_names: tuple[str, ...] = TASK_NAMES) -> Workspace:
  """Tasks, the pretrained base (built once per preset under `cache_root`, default OUT/cache) and the routing
  scores of every task in the official log format."""
  out.mkdir(parents=True, exist_ok=True)
  cache_root = cache_root or out / "cache"
  # The six FFT runs (and the six LoRA runs) compile the same steps: XLA's persistent cache compiles each once,
  # and a second run reuses them all.
  jax.config.update("jax_compilation_cache_dir", str(cache_root / "xla"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  tasks = {n: t for n, t in make_all_tasks(preset.n_train, preset.n_test, seed=preset.base.seed).items()
           if n in task_names}
  data = out / "data"
  data.mkdir(exist_ok=True)
  for name, task in tasks.items():
    _write_jsonl(data / f"{name}_train.jsonl", task.train)
    _write_jsonl(data / f"{name}_test.jsonl", task.test)

  base_dir, held_out = build_base(preset.base, tasks, cache_root, log)
  tokenizer = load_tokenizer(base_dir)
  base = load_hf_model(base_dir)

  summaries = _score_tasks(base, tokenizer, data, list(tasks), out / "scores", preset, log)
  return Workspace(out, preset, cache_root, tasks, base_dir, base, tokenizer, summaries, held_out)


def _demo_job(out: Path, task: str, method: str, lr: dict) -> Job:
  kind = {"FFT": "fft", "LoRA": "lora"}.get(method, "esft")
  expert_config = out / "scores" / task / f"experts_{SELECTION[method][0]}.json" if kind == "esft" else None
  return Job(f"{method} on {task}", task, kind, out / "runs" / f"{task}-{method}", lr[method], expert_config)


def share_device_with_workers(workers: int) -> None:
  """Call before this process's first computation. XLA preallocates 75% of a GPU to the first process that uses
  it; with workers > 1 this process and its workers (which inherit the environment) share one GPU, so each
  allocates on demand instead (on an H200 the demo's workers ran out of memory without it)."""
  if workers > 1:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


_WORKER_WORKSPACES: dict[tuple, Workspace] = {}  # in a worker process: the workspaces its earlier jobs built


def _worker_workspace(ws_args: dict, other_base: tuple | None) -> Workspace:
  key = (ws_args["out"], ws_args["cache_root"], ws_args["task_names"], other_base)
  if key not in _WORKER_WORKSPACES:
    _WORKER_WORKSPACES[key] = (prepare(log=lambda _: None, **ws_args) if other_base is None else
                               _worker_workspace(ws_args, None).for_base(*other_base, log=lambda _: None))
  return _WORKER_WORKSPACES[key]


def _prepare_args(ws: Workspace) -> dict:
  """`prepare`'s arguments that rebuild `ws` (or the workspace `ws.other_base` is derived from) in a worker."""
  return {"out": ws.out, "preset": ws.preset, "cache_root": ws.cache_root, "task_names": tuple(ws.tasks)}


def _worker_job(ws_args: dict, other_base: tuple | None, job: Job) -> tuple:
  return _worker_workspace(ws_args, other_base).run_job(job)


def in_worker_processes(calls: Sequence[tuple[Callable, tuple]], workers: int,
                        on_done: Callable[[int, Any], None]) -> None:
  """Runs each (function, arguments) of `calls` in `workers` spawned processes and calls `on_done(index, result)`
  here as each finishes. A call's error is raised here, and the calls still queued do not start (the running ones
  finish)."""
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
    futures = {pool.submit(fn, *args): i for i, (fn, args) in enumerate(calls)}
    try:
      for future in concurrent.futures.as_completed(futures):
        on_done(futures[future], future.result())
    except BaseException:
      pool.shutdown(cancel_futures=True)
      raise


def run_jobs(jobs: Sequence[tuple[Workspace, Job]], workers: int, log) -> list[tuple[dict, dict]]:
  """(summary, scores) per job, each run on its workspace, in order; a run folder named twice runs once. On a
  GPU host most of a short run is compilation, which is single-threaded per process: with workers > 1, worker
  processes (spawned, each rebuilding the cached workspace) overlap several runs' compilation with others' steps
  (see `share_device_with_workers`); runs already finished are read here, not in a worker."""
  unique = {job.run_dir: (ws, job) for ws, job in jobs}
  results, pending = {}, []
  for ws, job in unique.values():
    if workers > 1 and all((job.run_dir / name).exists() for name in ("summary.json", "eval.json")):
      results[job.run_dir] = ws.run_job(job)[:2]
    else:
      pending.append((ws, job))

  def done(job: Job, result: tuple) -> None:
    results[job.run_dir] = result[:2]
    log(f"{job.label} ({len(results)}/{len(unique)}): {result[2]}")

  if workers <= 1:
    for ws, job in pending:
      log(f"fine-tuning and evaluating {job.label}")
      done(job, ws.run_job(job))
  elif pending:
    calls = [(_worker_job, (_prepare_args(ws), ws.other_base, job)) for ws, job in pending]
    in_worker_processes(calls, workers, lambda i, result: done(pending[i][1], result))
  return [results[job.run_dir] for _, job in jobs]


def run_demo(out: Path, preset_name: str = "tiny", cache_root: Path | None = None, log=print,
             task_names: tuple[str, ...] = TASK_NAMES, methods: tuple[str, ...] = METHODS,
             preset: DemoPreset | None = None, workers: int | None = None) -> dict:
  """Runs (or resumes) the whole demo into `out`. `task_names`, `methods` and `preset` narrow it for tests.
  `workers` (default: the preset's) > 1 runs that many fine-tune-and-evaluate jobs at once in worker processes."""
  preset = preset or PRESETS[preset_name]
  workers = workers or preset.workers
  share_device_with_workers(workers)
  started = time.time()
  pairs = [(name, method) for name in task_names for method in methods]
  jobs = [_demo_job(out, name, method, preset.lr) for name, method in pairs]
  resumed_runs = sum((job.run_dir / "eval.json").exists() for job in jobs)
  ws = prepare(out, preset, cache_root, log, task_names)

  # The paper's routing figures and the selections.
  figures_dir = out / "figures"
  figures_dir.mkdir(exist_ok=True)
  routing = routing_figures_from_logs({name: out / "scores" / name for name in task_names},
                                      out_dir=figures_dir, top_k=ws.base.config.num_experts_per_tok)
  plot_routing_figures(routing, figures_dir)
  selections = {}
  for name in task_names:
    for score_kind, p in SELECTION.values():
      config = select_experts(ws.summaries[name], score_kind, p)
      write_expert_config(out / "scores" / name / f"experts_{score_kind}.json", config)
      selections[(name, score_kind)] = config
  plot_selected_experts(selections, figures_dir / "figure4_selected_experts.png")

  # Fine-tuning and evaluation: every method on every task, same data and steps; each run is then scored on
  # every task and on held-out general text.
  log("evaluating the base model")
  evaluations = {"base": ws.evaluate(ws.base.params, out / "runs" / "base_eval.json")}
  runs: dict[str, dict[str, dict]] = {}
  for (name, method), (summary, scores) in zip(pairs, run_jobs([(ws, job) for job in jobs], workers, log)):
    runs.setdefault(name, {})[method] = summary
    evaluations[f"{name}-{method}"] = scores
  results = {"preset": preset_name, "tasks": list(task_names), "methods": list(methods), "runs": runs,
             "evaluations": evaluations, "routing": routing,
             "selected_experts": {f"{t}-{m}": {l: len(v) for l, v in c["experts"].items()}
                                  for (t, m), c in selections.items()},
             "base_parameters": count_parameters(ws.base.params), "top_k": ws.base.config.num_experts_per_tok,
             "wall_seconds": time.time() - started, "resumed_runs": resumed_runs}
  atomic_write_text(out / "results.json", json.dumps(results, indent=1))
  write_report(out, results, preset_name)
  log(f"wrote {out / 'REPORT.md'}")
  return results
