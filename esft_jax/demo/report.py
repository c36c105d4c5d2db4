"""REPORT.md for the demo: the paper's Tables 1 and 2 in miniature, the efficiency table, the routing figures,
and, for each of the paper's findings, whether it held here, with the numbers."""

from __future__ import annotations

import platform
from pathlib import Path

import jax
import numpy as np

from esft_jax.files import atomic_write_text


def _fmt(x: float) -> str:
  return f"{100 * x:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines)


def _mean_known(values: list) -> float | None:
  known = [v for v in values if v is not None]
  return float(np.mean(known)) if known else None


def summarize(results: dict) -> dict:
  """The numbers behind the tables: per method, own-task scores, general loss, other-task scores, costs."""
  tasks, methods, evals = results["tasks"], results["methods"], results["evaluations"]
  summary = {"base": {"task": {t: evals["base"][t] for t in tasks}, "general_loss": [evals["base"]["general_loss"]],
                      "other_tasks": [float(np.mean([evals["base"][t] for t in tasks]))]}}
  for m in methods:
    runs = [evals[f"{t}-{m}"] for t in tasks]
    summary[m] = {
        "task": {t: evals[f"{t}-{m}"][t] for t in tasks},
        "general_loss": [r["general_loss"] for r in runs],
        "other_tasks": [float(np.mean([evals[f"{t}-{m}"][o] for o in tasks if o != t])) for t in tasks],
        "seconds": float(np.mean([results["runs"][t][m]["seconds"] for t in tasks])),
        "trainable_params": float(np.mean([results["runs"][t][m]["trainable_params"] for t in tasks])),
        "adapter_bytes": float(np.mean([results["runs"][t][m]["adapter_bytes"] for t in tasks])),
        "optimizer_state_bytes": float(np.mean([results["runs"][t][m]["optimizer_state_bytes"] for t in tasks])),
        # None where a run resumed from its final checkpoint and compiled no step.
        "step_peak_bytes": _mean_known([results["runs"][t][m]["step_peak_bytes"] for t in tasks]),
    }
  return summary


def findings(results: dict, summary: dict) -> list[str]:
  tasks, routing = results["tasks"], results["routing"]
  n_experts = len(next(iter(routing["concentration"].values())))
  k = results["top_k"]
  top_k_share = float(np.mean([np.sum(routing["concentration"][t][:k]) for t in tasks]))
  diag = float(np.mean([routing["overlap"][t][t] for t in tasks]))
  off = float(np.mean([routing["overlap"][a][b] for a in tasks for b in tasks if a != b]))

  def avg(m):
    return float(np.mean(list(summary[m]["task"].values())))

  fft, lora = avg("FFT"), avg("LoRA")
  esft = max(avg("ESFT-Token"), avg("ESFT-Gate"))
  gl = {m: float(np.mean(summary[m]["general_loss"])) for m in summary}
  other = {m: float(np.mean(summary[m]["other_tasks"])) for m in summary}
  held = lambda ok: "**held**" if ok else "**did not hold**"
  return [
      f"Routing is concentrated per task: the top {k} of {n_experts} experts carry {_fmt(top_k_share)}% of the "
      f"gate mass on average, against {_fmt(k / n_experts)}% if routing were uniform. "
      f"{held(top_k_share > 1.5 * k / n_experts)}.",
      f"Little overlap across tasks: two halves of the same task share {diag:.2f} of their top-{k} experts on "
      f"average, two different tasks {off:.2f}. {held(off < diag)}.",
      f"ESFT comes near FFT on the trained task: best ESFT average {_fmt(esft)} vs FFT {_fmt(fft)}. "
      f"{held(esft >= 0.9 * fft)} (criterion: at least 90% of FFT).",
      f"ESFT keeps more general ability than FFT: held-out general loss ESFT-Token {gl['ESFT-Token']:.3f}, "
      f"ESFT-Gate {gl['ESFT-Gate']:.3f}, FFT {gl['FFT']:.3f} (base {gl['base']:.3f}); score on the tasks not "
      f"trained on ESFT-Token {_fmt(other['ESFT-Token'])}, ESFT-Gate {_fmt(other['ESFT-Gate'])}, FFT "
      f"{_fmt(other['FFT'])}. {held(min(gl['ESFT-Token'], gl['ESFT-Gate']) < gl['FFT'])} (on general loss).",
      f"LoRA is behind ESFT on the trained task: LoRA {_fmt(lora)} vs best ESFT {_fmt(esft)}. {held(lora < esft)}.",
  ]


def write_report(out: Path, results: dict, preset: str) -> Path:
  tasks, methods = results["tasks"], results["methods"]
  summary = summarize(results)
  rows = [["Base"] + [_fmt(summary["base"]["task"][t]) for t in tasks]
          + [_fmt(np.mean(list(summary["base"]["task"].values())))]]
  rows += [[m] + [_fmt(summary[m]["task"][t]) for t in tasks] + [_fmt(np.mean(list(summary[m]["task"].values())))]
           for m in methods]
  table1 = _table(["method"] + list(tasks) + ["average"], rows)
  general_rows = [[name, f"{np.mean(s['general_loss']):.3f} ± {np.std(s['general_loss']):.3f}",
                   f"{_fmt(np.mean(s['other_tasks']))} ± {_fmt(np.std(s['other_tasks']))}"]
                  for name, s in [("Base", summary["base"])] + [(m, summary[m]) for m in methods]]
  table2 = _table(["method", "held-out general loss (↓)", "score on tasks not trained on (↑)"], general_rows)
  eff_rows = [[m, f"{summary[m]['seconds']:.1f}", f"{summary[m]['trainable_params']:,.0f}",
               f"{summary[m]['adapter_bytes'] / 2**20:.2f}", f"{summary[m]['optimizer_state_bytes'] / 2**20:.2f}",
               "–" if summary[m]["step_peak_bytes"] is None else f"{summary[m]['step_peak_bytes'] / 2**20:.1f}"]
              for m in methods]
  table3 = _table(["method", "wall time per run (s)", "trainable parameters", "adapter on disk (MiB)",
                   "optimizer state (MiB)", "peak memory of a train step (MiB)"], eff_rows)
  wall = f"{results['wall_seconds'] / 60:.1f} min"
  if results.get("resumed_runs"):
    wall += (f" (this invocation only: it reused {results['resumed_runs']} of "
             f"{len(results['tasks']) * len(methods)} runs that earlier invocations had finished)")
  text = f"""# esft-jax demo: ESFT in miniature

Preset `{preset}`; base model of {results['base_parameters']:,} parameters; total wall time
{wall} on {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}),
jax {jax.__version__}. Generated with `esft-jax demo --preset {preset}`.

Scores are percentages (intent: exact match; math: final answer; code: pass@1; translation: chrF; summary and
law: ROUGE-L). Each fine-tuned model is scored on the task it was trained on (Table 1) and on general ability
(Table 2: loss on held-out standard-library text, and the average score on the five tasks it was not trained on,
mean ± std over the six trained models).

## Table 1: downstream tasks

{table1}

## Table 2: general ability

{table2}

## Efficiency

Per run, mean over the six tasks. "Optimizer state" is AdamW's measured moments for the trainable parameters;
the frozen model is shared by every method. "Peak memory" is the compiled training step's peak device memory as
XLA plans it (frozen and trainable parameters, optimizer state, batch, activations and gradients), the same
measure on every backend.

{table3}

## The paper's findings, here

""" + "\n".join(f"- {f}" for f in findings(results, summary)) + """

## Figures

- Figure 2, routing concentration (share of gate mass by expert rank, mean and spread over layers):
  ![](figures/figure2_concentration.png)
- Figure 3, overlap of top-k experts between two halves of each pair of tasks: ![](figures/figure3_overlap.png)
- Figure 4, experts selected per layer, per task and method: ![](figures/figure4_selected_experts.png)
"""
  atomic_write_text(out / "REPORT.md", text)
  return out / "REPORT.md"
