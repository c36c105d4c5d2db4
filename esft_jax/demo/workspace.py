"""What every experiment on the miniature shares: the cached workspace of one seed and the job pool.

A workspace holds, for one seed, the generated tasks and general instruction families (under `OUT/seed-S/data`),
the aligned base model (pretrained once, aligned per seed, both cached under the cache root), its tokenizer, the
held-out general text and each task's routing scores (`OUT/seed-S/scores`). A `Job` is one fine-tuning run and
its evaluation; `run_jobs` runs many, in worker processes where asked. Every stage caches its result as JSON
beside its output, so an interrupted experiment resumes where it stopped.
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
import numpy as np

from esft_jax.data.jsonl import read_jsonl
from esft_jax.data.pipeline import DataConfig, format_records
from esft_jax.data.sources import open_examples
from esft_jax.demo.pretrain import AlignSpec, BaseSpec, build_aligned, build_base, text_example
from esft_jax.demo.tasks import (TASK_NAMES, alignment_mix, alignment_records, make_all_tasks,
                                 make_general_tasks)
from esft_jax.esft.routing_pass import sample_until, score_examples
from esft_jax.evaluate.runner import evaluate_generation, heldout_loss, multiple_choice, prompt_ids
from esft_jax.files import atomic_write_text
from esft_jax.generate import bucket
from esft_jax.interop.adapter import load_adapter
from esft_jax.interop.hf import load_hf_model
from esft_jax.interop.tokenizer import load_tokenizer
from esft_jax.train.run import finetune
from esft_jax.train.trainer import TrainConfig

# How a task's fine-tuning data is made: "mixed" adds as many alignment records as the task has (the paper's
# main tables), "unmixed" is the task alone (its Tables 9 and 10).
SETTINGS = ("mixed", "unmixed")


@dataclasses.dataclass(frozen=True)
class DemoPreset:
  base: BaseSpec
  align: AlignSpec
  n_train: int  # train items per task
  n_test: int  # test items per task
  n_general_test: int  # test items per general family: the general-ability benchmarks
  score_tokens: int  # tokens of a task's train split routed for its expert scores
  finetune_steps: int
  finetune_batch: int
  finetune_seq_length: int
  # The learning-rate search: one grid for every method (the paper's {1e-5, 3e-5, 1e-4, 3e-4}, scaled to the
  # miniature's short runs), run in the mixed setting on `search_tasks`, each method taking the rate of lowest
  # mean validation loss.
  lr_grid: tuple[float, ...]
  search_tasks: tuple[str, ...]
  settings: tuple[str, ...]  # of SETTINGS
  seeds: tuple[int, ...]
  max_new_tokens: int
  eval_batch: int
  workers: int = 1  # fine-tune-and-evaluate jobs at once (see `run_jobs`)


def _write_jsonl(path: Path, records: list[dict]) -> Path:
  atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
  return path


def cached_json(path: Path, compute: Callable[[], Any]) -> Any:
  """`compute()`'s value, stored at `path` the first time and read from there after."""
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
  setting: str = "mixed"  # of SETTINGS
  evaluate: bool = True  # False: fine-tune only (the learning-rate search reads validation losses)


@dataclasses.dataclass
class Workspace:
  out: Path  # the experiment's root, shared by its seeds and the ablations
  seed: int
  preset: DemoPreset
  cache_root: Path
  tasks: dict
  general: dict  # the general instruction families (alignment data and general-ability benchmarks)
  base_dir: Path
  base: Any  # LoadedModel
  tokenizer: Any
  summaries: dict  # task -> routing summary (ESFT's scores)
  held_out_texts: list
  # `for_base`'s arguments when this workspace is on another base: how a worker process rebuilds it.
  other_base: tuple | None = None

  @property
  def dir(self) -> Path:
    return self.out / f"seed-{self.seed}"

  @property
  def data(self) -> Path:
    return self.dir / "data"

  @property
  def dtype(self):
    return jnp.dtype(self.preset.base.compute_dtype)

  @property
  def alignment(self) -> list[dict]:
    return alignment_records(self.general)

  @functools.cached_property
  def held_out(self) -> list:
    """The held-out general texts as samples of this workspace's tokenizer."""
    return [text_example(self.tokenizer, t, f"held-out:{i}") for i, t in enumerate(self.held_out_texts)]

  def train_file(self, task: str, setting: str) -> Path:
    return self.data / (f"{task}_train.jsonl" if setting == "unmixed" else f"{task}_mixed_train.jsonl")

  def fine_tune(self, task: str, kind: str, run_dir: Path, lr: float, expert_config: Path | None = None,
                lora_rank: int = 8, setting: str = "mixed") -> dict:
    """One fine-tuning run (kind fft, lora or esft) on the task's data in `setting`; its summary, cached. The
    seed orders the data and initialises what the run creates (LoRA's factors)."""
    def compute():
      preset = self.preset
      train_cfg = TrainConfig(steps=preset.finetune_steps, lr=lr, grad_accum=1,
                              eval_every=max(1, preset.finetune_steps // 4),
                              save_every=preset.finetune_steps, log_every=10, seed=self.seed,
                              compute_dtype=preset.base.compute_dtype, expert_impl=preset.base.expert_impl)
      data_cfg = DataConfig(seq_length=preset.finetune_seq_length, validation_fraction=0.05, seed=self.seed)
      result = finetune(self.base_dir, str(self.train_file(task, setting)), kind, run_dir, train_cfg, data_cfg,
                        preset.finetune_batch, expert_config, resume=True, lora_rank=lora_rank,
                        param_dtype="float32")
      return {"trainable_params": result.trainable_params, "optimizer_state_bytes": result.optimizer_state_bytes,
              "seconds": result.wall_seconds, "best_val_loss": result.best_val_loss,
              "step_peak_bytes": result.step_peak_bytes, "adapter_bytes": _dir_bytes(run_dir / "adapter")}

    return cached_json(run_dir / "summary.json", compute)

  @functools.cached_property
  def test_items(self) -> dict[str, list]:
    return {name: read_jsonl(self.data / f"{name}_test.jsonl") for name in self.tasks}

  @functools.cached_property
  def prompt_length(self) -> int:
    """Every test prompt is padded to this one length, so all evaluations of a workspace compile generation
    once."""
    return bucket(max(len(prompt_ids(self.tokenizer, item.prompt))
                      for items in self.test_items.values() for item in items))

  def evaluate(self, params, cache_file: Path, tasks: Sequence[str] | None = None) -> dict:
    """The test scores of `params` on `tasks` (default: every task) and on every general family (multiple-choice
    accuracy), their mean ("general_score") and the held-out general text loss ("general_loss"), cached."""
    return cached_json(cache_file, lambda: self._scores(params, self.tasks if tasks is None else tasks))

  def _score(self, params, name: str) -> float:
    return evaluate_generation(self.base.config, params, self.tokenizer, self.test_items[name],
                               self.tasks[name].metric, self.preset.max_new_tokens, self.preset.eval_batch, self.dtype,
                               prompt_length=self.prompt_length, expert_impl=self.preset.base.expert_impl)["mean"]

  def _scores(self, params, tasks: Sequence[str]) -> dict:
    scores = {name: self._score(params, name) for name in tasks}
    scores |= {name: multiple_choice(self.base.config, params, self.tokenizer, self.data / f"{name}_test.jsonl",
                                     self.preset.eval_batch, self.dtype)["mean"] for name in self.general}
    scores["general_score"] = float(np.mean([scores[name] for name in self.general]))
    scores["general_loss"] = heldout_loss(self.base.config, params, self.held_out, self.preset.eval_batch,
                                          self.dtype, self.preset.base.expert_impl)["mean"]
    return scores

  def run_job(self, job: Job) -> tuple[dict, dict, str]:
    """The run's summary, its scores on its own task and general ability ({} when the job does not evaluate),
    and a line on where its time went."""
    started = time.time()
    summary = self.fine_tune(job.task, job.kind, job.run_dir, job.lr, job.expert_config, job.lora_rank,
                             job.setting)
    tuned = time.time()
    if not job.evaluate:
      return summary, {}, f"fine-tuned in {tuned - started:.0f} s"
    scores = cached_json(job.run_dir / "eval.json", lambda: self._scores(
        load_adapter(job.run_dir / "adapter", self.base.config, self.base.params), [job.task]))
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
  """Each task's routing summary on `base` (cached), with the official routing logs beside it. Routing is scored
  on the task's own train split, not the mixed one: it is the task's experts that ESFT selects."""
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
    summaries[name] = cached_json(task_dir / "summary.json", score)
  return summaries


def prepare(out: Path, preset: DemoPreset, seed: int, cache_root: Path | None = None, log=print,
            task_names: tuple[str, ...] = TASK_NAMES) -> Workspace:
  """The seed's tasks and general families, the aligned base (pretrained once per preset and aligned once per
  seed under `cache_root`, default OUT/cache) and the routing scores of every task in the official log format."""
  cache_root = cache_root or out / "cache"
  # The six FFT runs (and the six LoRA runs) compile the same steps: XLA's persistent cache compiles each once,
  # and a second run reuses them all.
  jax.config.update("jax_compilation_cache_dir", str(cache_root / "xla"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  tasks = {n: t for n, t in make_all_tasks(preset.n_train, preset.n_test, seed=seed).items() if n in task_names}
  general = make_general_tasks(preset.align.examples_per_family, preset.n_general_test, seed=seed)
  data = out / f"seed-{seed}" / "data"
  data.mkdir(parents=True, exist_ok=True)
  for name, family in general.items():
    _write_jsonl(data / f"{name}_test.jsonl", family.test)
  for name, task in tasks.items():
    _write_jsonl(data / f"{name}_train.jsonl", task.train)
    _write_jsonl(data / f"{name}_test.jsonl", task.test)
    # Shuffled with the alignment records, so a fine-tuning batch holds both.
    mixed = task.train + alignment_mix(general, len(task.train), seed=seed * 1000 + TASK_NAMES.index(name))
    np.random.default_rng(seed).shuffle(mixed)
    _write_jsonl(data / f"{name}_mixed_train.jsonl", mixed)

  base_dir = build_aligned(preset.base, preset.align, alignment_records(general), seed, cache_root, log)
  _, held_out = build_base(preset.base, cache_root, log)
  tokenizer = load_tokenizer(base_dir)
  base = load_hf_model(base_dir)
  summaries = _score_tasks(base, tokenizer, data, list(tasks), out / f"seed-{seed}" / "scores", preset, log)
  return Workspace(out, seed, preset, cache_root, tasks, general, base_dir, base, tokenizer, summaries, held_out)


def share_device_with_workers(workers: int) -> None:
  """Call before this process's first computation. XLA preallocates 75% of a GPU to the first process that uses
  it; with workers > 1 this process and its workers (which inherit the environment) share one GPU, so each
  allocates on demand instead (on an H200 the demo's workers ran out of memory without it)."""
  if workers > 1:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


_WORKER_WORKSPACES: dict[tuple, Workspace] = {}  # in a worker process: the workspaces its earlier jobs built


def _worker_workspace(ws_args: dict, other_base: tuple | None) -> Workspace:
  key = (ws_args["out"], ws_args["seed"], ws_args["cache_root"], ws_args["task_names"], other_base)
  if key not in _WORKER_WORKSPACES:
    _WORKER_WORKSPACES[key] = (prepare(log=lambda _: None, **ws_args) if other_base is None else
                               _worker_workspace(ws_args, None).for_base(*other_base, log=lambda _: None))
  return _WORKER_WORKSPACES[key]


def _prepare_args(ws: Workspace) -> dict:
  """`prepare`'s arguments that rebuild `ws` (or the workspace `ws.other_base` is derived from) in a worker."""
  return {"out": ws.out, "preset": ws.preset, "seed": ws.seed, "cache_root": ws.cache_root,
          "task_names": tuple(ws.tasks)}


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


def _finished(job: Job) -> bool:
  return all((job.run_dir / name).exists() for name in ("summary.json",) + (("eval.json",) if job.evaluate else ()))


def run_jobs(jobs: Sequence[tuple[Workspace, Job]], workers: int, log) -> list[tuple[dict, dict]]:
  """(summary, scores) per job, each run on its workspace, in order; a run folder named twice runs once. On a
  GPU host most of a short run is compilation, which is single-threaded per process: with workers > 1, worker
  processes (spawned, each rebuilding the cached workspace) overlap several runs' compilation with others' steps
  (see `share_device_with_workers`); runs already finished are read here, not in a worker."""
  unique = {job.run_dir: (ws, job) for ws, job in jobs}
  results, pending = {}, []
  for ws, job in unique.values():
    if workers > 1 and _finished(job):
      results[job.run_dir] = ws.run_job(job)[:2]
    else:
      pending.append((ws, job))

  def done(job: Job, result: tuple) -> None:
    results[job.run_dir] = result[:2]
    log(f"{job.label} ({len(results)}/{len(unique)}): {result[2]}")

  if workers <= 1:
    for ws, job in pending:
      log(f"fine-tuning {job.label}")
      done(job, ws.run_job(job))
  elif pending:
    calls = [(_worker_job, (_prepare_args(ws), ws.other_base, job)) for ws, job in pending]
    in_worker_processes(calls, workers, lambda i, result: done(pending[i][1], result))
  return [results[job.run_dir] for _, job in jobs]
