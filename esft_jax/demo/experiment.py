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

import dataclasses
import json
import time
from pathlib import Path

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
from esft_jax.evaluate.runner import evaluate_generation, heldout_loss
from esft_jax.files import atomic_write_text
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
  lr: dict  # method -> learning rate (the paper's, scaled up for a short run on a tiny model)
  max_new_tokens: int
  eval_batch: int


PRESETS = {
    "tiny": DemoPreset(
        base=BaseSpec(vocab_size=2048, hidden_size=128, num_layers=4, num_heads=4, routed_experts=16,
                      experts_per_token=4, shared_experts=1, expert_width=64, dense_width=256, kv_lora_rank=32,
                      seq_length=128, general_chars=300_000, held_out_chars=20_000, format_examples_per_task=60,
                      steps=300, batch_size=16, lr=3e-3),
        n_train=400, n_test=24, score_tokens=6_000, finetune_steps=60, finetune_batch=8, finetune_seq_length=128,
        lr={"FFT": 3e-4, "LoRA": 1e-3, "ESFT-Token": 1e-3, "ESFT-Gate": 1e-3}, max_new_tokens=48, eval_batch=24),
    "small": DemoPreset(
        base=BaseSpec(vocab_size=8192, hidden_size=512, num_layers=8, num_heads=8, routed_experts=64,
                      experts_per_token=6, shared_experts=2, expert_width=128, dense_width=1408, kv_lora_rank=128,
                      seq_length=512, general_chars=1_300_000, held_out_chars=60_000, format_examples_per_task=300,
                      steps=2500, batch_size=32, lr=1.5e-3),
        n_train=2000, n_test=100, score_tokens=32_768, finetune_steps=300, finetune_batch=16,
        finetune_seq_length=512, lr={"FFT": 1e-4, "LoRA": 5e-4, "ESFT-Token": 3e-4, "ESFT-Gate": 3e-4},
        max_new_tokens=64, eval_batch=50),
}


def _write_jsonl(path: Path, records: list[dict]) -> Path:
  atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
  return path


def _cached_json(path: Path, compute):
  if path.exists():
    return json.loads(path.read_text())
  value = compute()
  atomic_write_text(path, json.dumps(value, ensure_ascii=False, indent=1))
  return value


def _dir_bytes(path: Path) -> int:
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_demo(out: Path, preset_name: str = "tiny", cache_root: Path | None = None, log=print,
             task_names: tuple[str, ...] = TASK_NAMES, methods: tuple[str, ...] = METHODS,
             preset: DemoPreset | None = None) -> dict:
  """Runs (or resumes) the whole demo into `out`. `task_names`, `methods` and `preset` narrow it for tests."""
  preset = preset or PRESETS[preset_name]
  out.mkdir(parents=True, exist_ok=True)
  started = time.time()
  tasks = {n: t for n, t in make_all_tasks(preset.n_train, preset.n_test, seed=preset.base.seed).items()
           if n in task_names}
  data = out / "data"
  data.mkdir(exist_ok=True)
  for name, task in tasks.items():
    _write_jsonl(data / f"{name}_train.jsonl", task.train)
    _write_jsonl(data / f"{name}_test.jsonl", task.test)

  base_dir, held_out = build_base(preset.base, tasks, cache_root or out / "cache", log)
  tokenizer = load_tokenizer(base_dir)
  base = load_hf_model(base_dir)
  held_out_examples = [text_example(tokenizer, t, f"held-out:{i}") for i, t in enumerate(held_out)]

  # Routing scores in the official log format, the paper's routing figures, and the selections.
  scores_dir = out / "scores"
  summaries = {}
  for name in task_names:
    task_dir = scores_dir / name

    def score(name=name, task_dir=task_dir):
      examples = format_records(open_examples(data / f"{name}_train.jsonl"), tokenizer)
      chosen = sample_until(examples, preset.score_tokens)
      return score_examples(base.config, base.params, chosen, batch_size=16, log_dir=task_dir)

    task_dir.mkdir(parents=True, exist_ok=True)
    summaries[name] = _cached_json(task_dir / "summary.json", score)
  figures_dir = out / "figures"
  figures_dir.mkdir(exist_ok=True)
  routing = routing_figures_from_logs({name: scores_dir / name for name in task_names},
                                      out_dir=figures_dir, top_k=base.config.num_experts_per_tok)
  plot_routing_figures(routing, figures_dir)
  selections = {}
  for name in task_names:
    for method, (score_kind, p) in SELECTION.items():
      config = select_experts(summaries[name], score_kind, p)
      write_expert_config(out / "scores" / name / f"experts_{score_kind}.json", config)
      selections[(name, score_kind)] = config
  plot_selected_experts(selections, figures_dir / "figure4_selected_experts.png")

  # Fine-tuning: every method on every task, same data and steps.
  runs: dict[str, dict[str, dict]] = {}
  for name in task_names:
    for method in methods:
      run_dir = out / "runs" / f"{name}-{method}"

      def fine_tune(name=name, method=method, run_dir=run_dir):
        kind = {"FFT": "fft", "LoRA": "lora"}.get(method, "esft")
        expert_config = None
        if kind == "esft":
          expert_config = out / "scores" / name / f"experts_{SELECTION[method][0]}.json"
        train_cfg = TrainConfig(steps=preset.finetune_steps, lr=preset.lr[method], eval_every=max(1, preset.finetune_steps // 3),
                                save_every=preset.finetune_steps, log_every=10, compute_dtype="float32")
        data_cfg = DataConfig(seq_length=preset.finetune_seq_length, validation_fraction=0.05)
        result = finetune(base_dir, str(data / f"{name}_train.jsonl"), kind, run_dir, train_cfg, data_cfg,
                          preset.finetune_batch, expert_config, resume=True, param_dtype="float32")
        return {"trainable_params": result.trainable_params, "optimizer_state_bytes": result.optimizer_state_bytes,
                "seconds": result.wall_seconds, "best_val_loss": result.best_val_loss,
                "adapter_bytes": _dir_bytes(run_dir / "adapter")}

      log(f"fine-tuning {method} on {name}")
      runs.setdefault(name, {})[method] = _cached_json(run_dir / "summary.json", fine_tune)

  # Evaluation: the base model and every fine-tuned model on every task and on held-out general text.
  def evaluate(params, cache_file: Path) -> dict:
    def compute():
      scores = {}
      for task_name in task_names:
        items = read_jsonl(data / f"{task_name}_test.jsonl")
        result = evaluate_generation(base.config, params, tokenizer, items, tasks[task_name].metric,
                                     preset.max_new_tokens, preset.eval_batch)
        scores[task_name] = result["mean"]
      scores["general_loss"] = heldout_loss(base.config, params, held_out_examples, preset.eval_batch)["mean"]
      return scores
    return _cached_json(cache_file, compute)

  log("evaluating the base model")
  evaluations = {"base": evaluate(base.params, out / "runs" / "base_eval.json")}
  for name in task_names:
    for method in methods:
      log(f"evaluating {method} trained on {name}")
      run_dir = out / "runs" / f"{name}-{method}"
      params = load_adapter(run_dir / "adapter", base.config, base.params)
      evaluations[f"{name}-{method}"] = evaluate(params, run_dir / "eval.json")

  results = {"preset": preset_name, "tasks": list(task_names), "methods": list(methods), "runs": runs,
             "evaluations": evaluations, "routing": routing,
             "selected_experts": {f"{t}-{m}": {l: len(v) for l, v in c["experts"].items()}
                                  for (t, m), c in selections.items()},
             "base_parameters": count_parameters(base.params), "top_k": base.config.num_experts_per_tok,
             "wall_seconds": time.time() - started}
  atomic_write_text(out / "results.json", json.dumps(results, indent=1))
  write_report(out, results, preset_name)
  log(f"wrote {out / 'REPORT.md'}")
  return results
