"""REPORT.md and results.json for the demo: the protocol, the paper's Tables 1 and 2 in miniature (mean ± std over
seeds), the learning-rate search, the efficiency table, each of the paper's findings tested beyond the spread, and
the diagnostics that explain a finding that does not hold."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import jax
import numpy as np

from esft_jax.analysis.figures import figure, save_figure
from esft_jax.demo.spread import finding, pm
from esft_jax.files import atomic_write_text
from esft_jax.train.metrics import validation_losses

PROTOCOL = """\
The protocol follows the paper's section 3.1 and was fixed before any result was seen:
- **Base.** A DeepSeekMoE-style model pretrained on standard-library text and on examples of the two enhancement
  tasks (math, code), then aligned by full fine-tuning on four general instruction families (fact recall, word
  reversal, categories, opposites) that exclude math and code, with as many pretraining examples replayed beside
  them, for {align_steps} steps at lr {align_lr:g}, the checkpoint of lowest validation loss kept (its curve is under
  Diagnostics): the paper's "vanilla" model, which has partial skill on the enhancement tasks and little on the
  adaptation tasks (intent, summary, law, translation).
- **Training.** Every method fine-tunes on the same data and steps, the task's train split mixed 1:1 with
  alignment records (Table 1's setting){unmixed}; validation on 5% of the packed training rows every quarter of the
  run, the best checkpoint kept. ESFT selects experts by routing the task's own train split (token p=0.2,
  gate p=0.1); LoRA is rank 8.
- **Learning rates.** One grid for every method ({grid}, the paper's 4-point grid scaled to the miniature's
  short runs), searched in the mixed setting on {search_tasks} with seed {search_seed}; each method takes the rate
  of lowest mean validation loss on the training data's held-out split. Test scores play no part.{reused}
- **Evaluation.** Each fine-tuned model on its own task's test split (Table 1) and on general ability (Table 2:
  four-way multiple choice by log-likelihood on the general families' test splits, as the paper scores MMLU, ARC
  and HellaSwag, chance 25%; and the loss on held-out standard-library text).
- **Findings.** Each finding is a margin per task and seed (positive where the paper's claim holds). It holds
  only when its mean exceeds the spread: the standard deviation over seeds of the per-seed mean margin, or with one
  seed the standard error over tasks. Within the spread it is reported as not holding."""


def _pct(x: float) -> str:
  return f"{100 * x:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines)


def main_setting(results: dict) -> str:
  return "mixed" if "mixed" in results["settings"] else results["settings"][0]


def _runs(results: dict, seed: str, setting: str) -> dict:
  return results["per_seed"][seed]["runs"][setting]


def task_average(results: dict, seed: str, setting: str, method: str) -> float:
  runs = _runs(results, seed, setting)
  return float(np.mean([runs[t][method]["scores"][t] for t in results["tasks"]]))


def protocol_text(results: dict) -> str:
  """The report's protocol section for `results`' settings and learning-rate search."""
  search = results["lr_search"]
  unmixed = "unmixed" in results["settings"] and main_setting(results) == "mixed"
  return PROTOCOL.format(
      align_steps=results["alignment"]["steps"], align_lr=results["alignment"]["lr"],
      unmixed=", and unmixed, the task's data alone (Tables 9 and 10)" if unmixed else "",
      grid=", ".join(f"{lr:g}" for lr in search["grid"]), search_tasks=" and ".join(search["tasks"]),
      search_seed=search["seed"],
      reused=(f" The rates were not searched in this run: they are those of the search in `{search['reused_from']}`, "
              "run earlier on this preset." if "reused_from" in search else ""))


def findings(results: dict) -> list[dict]:
  """The paper's five findings, each as {"finding", "held", "evidence", "margin", "spread"}."""
  seeds, tasks, setting, k = [str(s) for s in results["seeds"]], results["tasks"], main_setting(results), \
      results["top_k"]
  per_seed = results["per_seed"]
  n_experts = len(next(iter(per_seed[seeds[0]]["routing"]["concentration"].values())))
  uniform = k / n_experts

  def margins(fn) -> dict[str, list[float]]:
    return {s: [fn(s, t) for t in tasks] for s in seeds}

  def share(s, t):
    return float(np.sum(per_seed[s]["routing"]["concentration"][t][:k]))

  def overlap_gap(s, t):
    o = per_seed[s]["routing"]["overlap"]
    return o[t][t] - float(np.mean([o[t][b] for b in tasks if b != t]))

  def score(s, t, m, key=None):
    return _runs(results, s, setting)[t][m]["scores"][key or t]

  mean_share = np.mean([share(s, t) for s in seeds for t in tasks])
  found = [
      finding(f"Routing is concentrated per task: the top {k} of {n_experts} experts carry more than 1.5x the "
               "uniform share of the gate mass",
               margins(lambda s, t: share(s, t) - 1.5 * uniform),
               f"top-{k} share {_pct(mean_share)}% against {_pct(uniform)}% uniform"),
      finding(f"Little overlap across tasks: two halves of one task share more of their top-{k} experts than two "
               "different tasks do", margins(overlap_gap),
               "shared top experts, same task {:.2f}, different tasks {:.2f}".format(
                   np.mean([per_seed[s]["routing"]["overlap"][t][t] for s in seeds for t in tasks]),
                   np.mean([per_seed[s]["routing"]["overlap"][a][b] for s in seeds for a in tasks for b in tasks
                            if a != b])), unit="experts", scale=1),
  ]
  averages = {m: [task_average(results, s, setting, m) for s in seeds] for m in results["methods"]}
  esft = [m for m in ("ESFT-Token", "ESFT-Gate") if m in results["methods"]]
  fmt = lambda m: f"{m} {pm(averages[m])}"
  found.append(finding(
      "ESFT comes near FFT on the trained tasks: every ESFT variant reaches at least 90% of FFT's score",
      margins(lambda s, t: min(score(s, t, m) for m in esft) - 0.9 * score(s, t, "FFT")),
      "task average " + ", ".join(fmt(m) for m in ["FFT"] + esft) + " (worse ESFT variant per task against 0.9 FFT)"))
  general = {m: [np.mean([score(s, t, m, "general_score") for t in tasks]) for s in seeds] for m in results["methods"]}
  loss = {m: [np.mean([score(s, t, m, "general_loss") for t in tasks]) for s in seeds] for m in results["methods"]}
  base_general = np.mean([per_seed[s]["base"]["general_score"] for s in seeds])
  found.append(finding(
      "ESFT keeps more general ability than FFT: every ESFT variant's general-benchmark score is above FFT's",
      margins(lambda s, t: min(score(s, t, m, "general_score") for m in esft) - score(s, t, "FFT", "general_score")),
      "general score " + ", ".join(f"{m} {pm(general[m])}" for m in ["FFT"] + esft)
      + f" (aligned base {_pct(base_general)}); held-out text loss "
      + ", ".join(f"{m} {np.mean(loss[m]):.3f}" for m in ["FFT"] + esft)))
  found.append(finding(
      "LoRA is behind ESFT on the trained tasks: every ESFT variant scores above LoRA",
      margins(lambda s, t: min(score(s, t, m) for m in esft) - score(s, t, "LoRA")),
      "task average " + ", ".join(fmt(m) for m in ["LoRA"] + esft)))
  return found


def _task_table(results: dict, setting: str) -> str:
  seeds, tasks = [str(s) for s in results["seeds"]], results["tasks"]
  rows = [["Base (aligned)"] + [pm([results["per_seed"][s]["base"][t] for s in seeds]) for t in tasks]
          + [pm([np.mean([results["per_seed"][s]["base"][t] for t in tasks]) for s in seeds])]]
  for m in results["methods"]:
    rows.append([m] + [pm([_runs(results, s, setting)[t][m]["scores"][t] for s in seeds]) for t in tasks]
                + [pm([task_average(results, s, setting, m) for s in seeds])])
  return _table(["method"] + tasks + ["average"], rows)


def _general_table(results: dict, setting: str) -> str:
  seeds, tasks, general = [str(s) for s in results["seeds"]], results["tasks"], results["general_tasks"]
  base = [results["per_seed"][s]["base"] for s in seeds]
  rows = [["Base (aligned)"] + [pm([b[g] for b in base]) for g in general]
          + [pm([b["general_score"] for b in base]), pm([b["general_loss"] for b in base], 1, 3)]]
  for m in results["methods"]:
    scores = [_runs(results, s, setting)[t][m]["scores"] for s in seeds for t in tasks]
    rows.append([m] + [pm([x[g] for x in scores]) for g in general]
                + [pm([x["general_score"] for x in scores]), pm([x["general_loss"] for x in scores], 1, 3)])
  return _table(["method"] + general + ["general average (↑)", "held-out text loss (↓)"], rows)


def _lr_table(search: dict) -> str:
  rows = [[m] + [f"{rates[f'{lr:g}']:.4f}" for lr in search["grid"]] + [f"{search['chosen'][m]:g}"]
          for m, rates in search["mean_val_loss"].items()]
  return _table(["method"] + [f"lr {lr:g}" for lr in search["grid"]] + ["chosen"], rows)


def _made_by_search(results: dict, seed: str, setting: str, task: str) -> bool:
  """Whether the run of (seed, setting, task) at its method's chosen rate is one the learning-rate search made
  (and the main runs read back): it ran beside the search's other runs, of its own method only."""
  search = results["lr_search"]
  return ("reused_from" not in search and str(search["seed"]) == seed and setting == search["setting"]
          and task in search["tasks"])


def _efficiency_table(results: dict, setting: str) -> str:
  seeds, tasks = [str(s) for s in results["seeds"]], results["tasks"]
  rows = []
  for m in results["methods"]:
    runs = [_runs(results, s, setting)[t][m] for s in seeds for t in tasks]
    mean = lambda key: float(np.mean([r[key] for r in runs]))
    timed = [_runs(results, s, setting)[t][m]["seconds"] for s in seeds for t in tasks
             if not _made_by_search(results, s, setting, t)]
    peaks = [r["step_peak_bytes"] for r in runs if r["step_peak_bytes"] is not None]
    rows.append([m, f"{np.mean(timed):.1f}" if timed else "–", f"{mean('trainable_params'):,.0f}",
                 f"{mean('adapter_bytes') / 2**20:.2f}", f"{mean('optimizer_state_bytes') / 2**20:.2f}",
                 f"{np.mean(peaks) / 2**20:.1f}" if peaks else "–"])
  return _table(["method", "wall time per run (s)", "trainable parameters", "adapter on disk (MiB)",
                 "optimizer state (MiB)", "peak memory of a train step (MiB)"], rows)


def _selected_share_table(results: dict) -> str:
  seeds, tasks = [str(s) for s in results["seeds"]], results["tasks"]
  rows = []
  for kind in ("token", "gate"):
    shares = [results["per_seed"][s]["selected_share"][f"{t}-{kind}"] for s in seeds for t in tasks]
    experts = [results["per_seed"][s]["selected_per_layer"][f"{t}-{kind}"] for s in seeds for t in tasks]
    rows.append([f"ESFT-{kind.title()}", f"{np.mean(experts):.2f}", pm(shares)])
  return _table(["method", "experts selected per layer", "share of the task's gate mass they carry (%)"], rows)


def _alignment_table(results: dict) -> str:
  """Per seed, the alignment's validation loss (general instructions and replayed pretraining text) at its first
  evaluation, halfway, at its best (the checkpoint kept) and at the end."""
  rows = []
  for s in map(str, results["seeds"]):
    curve = results["per_seed"][s]["alignment_val_loss"]
    best = min(curve, key=lambda point: point[1])
    half = curve[(len(curve) - 1) // 2]
    rows.append([s] + [f"{loss:.3f} (step {step})" for step, loss in (curve[0], half, best, curve[-1])])
  return _table(["seed", "first evaluation", "halfway", "best (kept)", "last"], rows)


def _plot_summary(results: dict, path: Path) -> Path:
  """Task average and general score per method, mean and std over seeds, with the aligned base's level."""
  seeds, tasks, setting = [str(s) for s in results["seeds"]], results["tasks"], main_setting(results)
  methods = results["methods"]
  fig = figure(9, 3.4)
  for ax, title, value, base_value in (
      (fig.add_subplot(1, 2, 1), "trained task (Table 1)", lambda s, m: task_average(results, s, setting, m),
       lambda s: np.mean([results["per_seed"][s]["base"][t] for t in tasks])),
      (fig.add_subplot(1, 2, 2), "general ability (Table 2)",
       lambda s, m: np.mean([_runs(results, s, setting)[t][m]["scores"]["general_score"] for t in tasks]),
       lambda s: results["per_seed"][s]["base"]["general_score"])):
    values = np.array([[100 * value(s, m) for s in seeds] for m in methods])
    ax.bar(methods, values.mean(axis=1), yerr=values.std(axis=1, ddof=1) if len(seeds) > 1 else None,
           capsize=4, color=["#888", "#c84", "#48c", "#4a8"][:len(methods)])
    ax.axhline(100 * np.mean([base_value(s) for s in seeds]), color="k", ls="--", lw=1, label="aligned base")
    ax.set_title(f"{title}, {len(seeds)} seed(s)")
    ax.set_ylabel("score (%)")
    ax.legend(loc="lower right", fontsize=8)
  return save_figure(fig, path)


def _plot_validation_curves(out: Path, results: dict, path: Path) -> Path:
  """Validation loss against step per task and method (first seed, main setting): whether a method plateaus."""
  seed, tasks, setting = str(results["seeds"][0]), results["tasks"], main_setting(results)
  fig = figure(3 * len(tasks), 2.6)
  for i, task in enumerate(tasks):
    ax = fig.add_subplot(1, len(tasks), i + 1)
    for m in results["methods"]:
      lr = _runs(results, seed, setting)[task][m]["lr"]
      points = validation_losses(out / f"seed-{seed}" / "runs" / f"{task}-{m}-{setting}-lr{lr:g}" / "metrics.jsonl")
      ax.plot(*zip(*points), marker=".", label=m)
    ax.set_title(task)
    ax.set_xlabel("step")
    if i == 0:
      ax.set_ylabel("validation loss")
      ax.legend(fontsize=7)
  return save_figure(fig, path)


def write_report(out: Path, results: dict) -> Path:
  """Adds `findings` to `results`, writes results.json, the summary figures and REPORT.md."""
  results["findings"] = findings(results)
  atomic_write_text(out / "results.json", json.dumps(results, indent=1))
  figures = out / "figures"
  figures.mkdir(exist_ok=True)
  _plot_summary(results, figures / "summary.png")
  _plot_validation_curves(out, results, figures / "validation_curves.png")
  setting, search = main_setting(results), results["lr_search"]
  unmixed = "unmixed" in results["settings"] and setting == "mixed"
  protocol = protocol_text(results)
  wall = f"{results['wall_seconds'] / 60:.1f} min"
  if results.get("resumed_runs"):
    wall += f" (this invocation only: {results['resumed_runs']} runs were finished by earlier invocations)"
  first = results["seeds"][0]
  sections = [
      f"# esft-jax demo: ESFT in miniature\n\nPreset `{results['preset']}`; seeds {results['seeds']}; aligned base "
      f"of {results['base_parameters']:,} parameters; total wall time {wall} on {jax.devices()[0].device_kind} "
      f"({platform.processor() or platform.machine()}), jax {jax.__version__}. Generated with `esft-jax demo "
      f"--preset {results['preset']} --seed {' '.join(map(str, results['seeds']))}"
      f" --setting {' '.join(results['settings'])}"
      + (f" --lr-search {search['reused_from']}" if "reused_from" in search else "") + "`.",
      "## Protocol\n\n" + protocol,
      "## The paper's findings, here\n\n" + "\n".join(
          f"- {f['finding']}. **{'held' if f['held'] else 'did not hold'}**: {f['evidence']}."
          for f in results["findings"]) + "\n\n![](figures/summary.png)",
      "## Table 1: downstream tasks\n\nScores in % (math: final answer; code: pass@1; intent: exact match; "
      "translation: chrF; summary and law: ROUGE-L), mean ± std over seeds, the task's data mixed 1:1 with "
      f"alignment data.\n\n{_task_table(results, setting)}"]
  if unmixed:
    sections.append("## Tables 9 and 10: the task's data alone\n\n" + _task_table(results, "unmixed") + "\n\n"
                    + _general_table(results, "unmixed"))
  sections += [
      "## Table 2: general ability\n\nMultiple-choice accuracy (%, chance 25) on each general family's test split "
      "and the loss on held-out standard-library text, mean ± std over every fine-tuned model (six tasks × "
      "seeds).\n\n"
      + _general_table(results, setting),
      "## Learning-rate search\n\nMean best validation loss over the search tasks per rate (mixed setting, seed "
      f"{search['seed']}):\n\n{_lr_table(search)}",
      "## Diagnostics\n\nThe alignment's validation loss (general families and replayed pretraining examples), per "
      f"seed:\n\n{_alignment_table(results)}\n\nHow much of each task's routing the selected experts carry (mean ± "
      f"std over tasks and seeds):\n\n{_selected_share_table(results)}\n\nValidation loss during fine-tuning (seed "
      f"{first}; a method whose curve is still falling at the end is held back by its step budget, one whose curve "
      "is flat is not):\n\n![](figures/validation_curves.png)",
      "## Efficiency\n\nPer run, mean over tasks and seeds. Wall time leaves out the runs the learning-rate search "
      "made, which ran beside runs of their own method only. \"Optimizer state\" is AdamW's measured moments for "
      "the trainable parameters; \"peak memory\" is the compiled training step's peak device memory as XLA plans "
      "it.\n\n"
      + _efficiency_table(results, setting),
      f"## Routing figures (seed {first})\n\n"
      f"- Figure 2, routing concentration: ![](seed-{first}/figures/figure2_concentration.png)\n"
      f"- Figure 3, overlap of top-k experts between tasks: ![](seed-{first}/figures/figure3_overlap.png)\n"
      f"- Figure 4, experts selected per layer: ![](seed-{first}/figures/figure4_selected_experts.png)"]
  atomic_write_text(out / "REPORT.md", "\n\n".join(sections) + "\n")
  return out / "REPORT.md"
