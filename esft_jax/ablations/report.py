"""REPORT.md and the figure of one ablation: a table of every variant (mean over the ablation's tasks), the
paper's finding with the numbers here and whether it agrees, and a PNG."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from esft_jax.analysis.figures import figure, save_figure
from esft_jax.files import atomic_write_text

FIGURE_PNG = "figure.png"


def _pct(x: float | None) -> str:
  return "–" if x is None else f"{100 * x:.1f}"


def _by_variant(rows: list[dict]) -> dict[str, dict]:
  """Per variant (in first-seen order): its fields and the means over tasks."""
  groups: dict[str, list[dict]] = defaultdict(list)
  for row in rows:
    groups[row["variant"]].append(row)
  means = {}
  for variant, group in groups.items():
    mean = lambda key: (float(np.mean([r[key] for r in group])) if group[0][key] is not None else None)
    means[variant] = {**group[0], "task_score": mean("task_score"), "general_loss": mean("general_loss"),
                      "other_tasks": mean("other_tasks"), "trainable_params": mean("trainable_params"),
                      "experts_per_layer": mean("experts_per_layer"), "tasks": [r["task"] for r in group]}
  return means


def _table(variants: dict[str, dict], base: dict, tasks: list[str]) -> str:
  base_task = float(np.mean([base[t] for t in tasks]))
  lines = ["| variant | experts per layer | trainable parameters | task score (↑) | general loss (↓) | "
           "other tasks (↑) |", "|---|---|---|---|---|---|",
           f"| base model | – | 0 | {_pct(base_task)} | {base['general_loss']:.3f} | – |"]
  for name, v in variants.items():
    experts = "–" if v["experts_per_layer"] is None else f"{v['experts_per_layer']:.2f}"
    lines.append(f"| {name} | {experts} | {v['trainable_params']:,.0f} | {_pct(v['task_score'])} | "
                 f"{v['general_loss']:.3f} | {_pct(v['other_tasks'])} |")
  return "\n".join(lines)


def _slope(x: list[float], y: list[float]) -> float:
  return float(np.polyfit(x, y, 1)[0]) if len(set(x)) > 1 else 0.0


def _agrees(ok: bool) -> str:
  return "**agrees with the paper**" if ok else "**does not agree with the paper**"


def _threshold_findings(variants: dict[str, dict]) -> list[str]:
  esft = [v for v in variants.values() if v["score"] in ("token", "gate")]
  x = [v["experts_per_layer"] for v in esft]
  task_slope = _slope(x, [v["task_score"] for v in esft])
  loss_slope = _slope(x, [v["general_loss"] for v in esft])
  return [
      f"Training more experts (larger p) costs general ability: general loss changes by {loss_slope:+.4f} per "
      f"extra expert per layer (least-squares slope over the token and gate runs). {_agrees(loss_slope > 0)}.",
      f"Task score changes by {100 * task_slope:+.2f} points per extra expert per layer; the paper finds it "
      f"rises with p and then saturates, so a small p already gets most of it. {_agrees(task_slope >= 0)}.",
  ]


def _what_to_train_findings(variants: dict[str, dict]) -> list[str]:
  relevant = variants["relevant experts"]
  others = {k: v for k, v in variants.items() if k != "relevant experts"}
  best_other = min(others, key=lambda k: others[k]["general_loss"])
  kept = relevant["general_loss"] <= others[best_other]["general_loss"]
  fft = variants["everything (FFT)"]
  return [
      f"Training only the relevant experts keeps general ability best: general loss {relevant['general_loss']:.3f}"
      f" against {others[best_other]['general_loss']:.3f} for the best other variant ({best_other}) and "
      f"{fft['general_loss']:.3f} for everything. {_agrees(kept)}.",
      f"Adding shared experts or non-expert modules buys little on the task: relevant experts "
      f"{_pct(relevant['task_score'])}, + shared {_pct(variants['+ shared experts']['task_score'])}, + non-expert "
      f"{_pct(variants['+ non-expert modules']['task_score'])}, everything {_pct(fft['task_score'])}.",
  ]


def _random_findings(variants: dict[str, dict]) -> list[str]:
  scored = next(v for k, v in variants.items() if k.startswith("scored"))
  random = [v for k, v in variants.items() if k.startswith("random")]
  random_task = float(np.mean([v["task_score"] for v in random]))
  random_loss = float(np.mean([v["general_loss"] for v in random]))
  return [
      f"Experts chosen by their scores beat as many random experts on the task: {_pct(scored['task_score'])} vs "
      f"{_pct(random_task)} (mean of {len(random)} seeds). {_agrees(scored['task_score'] > random_task)}.",
      f"General loss: scored {scored['general_loss']:.3f}, random {random_loss:.3f}.",
  ]


def _plot_threshold(variants: dict[str, dict], path: Path) -> None:
  fig = figure(10, 4)
  ax_task, ax_loss = fig.subplots(1, 2)
  for score, style in (("token", "o-"), ("gate", "s--")):
    runs = sorted((v for v in variants.values() if v["score"] == score), key=lambda v: v["experts_per_layer"])
    x = [v["experts_per_layer"] for v in runs]
    ax_task.plot(x, [100 * v["task_score"] for v in runs], style, label=f"ESFT-{score.title()}")
    ax_loss.plot(x, [v["general_loss"] for v in runs], style, label=f"ESFT-{score.title()}")
  for v in (v for v in variants.values() if v["score"] == "lora"):
    for ax, value in ((ax_task, 100 * v["task_score"]), (ax_loss, v["general_loss"])):
      ax.axhline(value, color="gray", linestyle=":", linewidth=1)
      ax.annotate(f"LoRA r={v['rank']}", (ax.get_xlim()[0], value), fontsize="x-small", color="gray")
  ax_task.set_ylabel("task score (mean over tasks)")
  ax_loss.set_ylabel("held-out general loss")
  for ax in (ax_task, ax_loss):
    ax.set_xlabel("average trained experts per layer")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
  fig.suptitle("Figure 6: threshold p, trained experts and performance")
  save_figure(fig, path)


def _plot_bars(variants: dict[str, dict], title: str, path: Path) -> None:
  fig = figure(10, 4)
  ax_task, ax_loss = fig.subplots(1, 2)
  names = list(variants)
  ax_task.barh(names, [100 * v["task_score"] for v in variants.values()])
  ax_loss.barh(names, [v["general_loss"] for v in variants.values()])
  ax_task.set_xlabel("task score (mean over tasks)")
  ax_loss.set_xlabel("held-out general loss (lower is better)")
  ax_loss.set_yticks([])
  low = min(v["general_loss"] for v in variants.values())
  ax_loss.set_xlim(left=low - 0.05 * abs(low))
  for ax in (ax_task, ax_loss):
    ax.invert_yaxis()
    ax.grid(True, axis="x", alpha=0.3)
  fig.suptitle(title)
  save_figure(fig, path)


_TITLES = {"threshold": "Threshold sweep (the paper's Figure 6)",
           "what_to_train": "What to train (the paper's Table 3)",
           "random_experts": "Scored against random experts (the paper's Table 4)"}


def write_ablation_report(root: Path, results: dict) -> Path:
  name, config = results["ablation"], results["config"]
  variants = _by_variant(results["rows"])
  if name == "threshold":
    finding_lines = _threshold_findings(variants)
    _plot_threshold(variants, root / FIGURE_PNG)
  else:
    finding_lines = (_what_to_train_findings if name == "what_to_train" else _random_findings)(variants)
    _plot_bars(variants, _TITLES[name], root / FIGURE_PNG)
  text = f"""# Ablation: {_TITLES[name]}

Preset `{results['preset']}` ({results['num_experts']} routed experts, top-{results['top_k']}); tasks
{', '.join(config['tasks'])}. Generated with `esft-jax ablate configs/ablations/{name}.json --preset
{results['preset']}`. Scores are percentages, mean over the tasks; "other tasks" is the mean score on the
demo's tasks the model was not trained on; general loss is on held-out standard-library text.

{_table(variants, results['base'], config['tasks'])}

## Findings

""" + "\n".join(f"- {line}" for line in finding_lines) + f"""

![]({FIGURE_PNG})
"""
  atomic_write_text(root / "REPORT.md", text)
  return root / "REPORT.md"
