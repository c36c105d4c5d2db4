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
    means[variant] = {**group[0], **{key: mean(key) for key in _MEANS if key in group[0]},
                      "tasks": [r["task"] for r in group], "task_scores": {r["task"]: r["task_score"] for r in group}}
  return means


_MEANS = ("task_score", "general_loss", "general_score", "trainable_params", "experts_per_layer",
          "fine_experts_per_layer", "selected_fraction", "concentration")


def _table(variants: dict[str, dict], base: dict, tasks: list[str]) -> str:
  base_task = float(np.mean([base[t] for t in tasks]))
  lines = ["| variant | experts per layer | trainable parameters | task score (↑) | general loss (↓) | "
           "general tasks (↑) |", "|---|---|---|---|---|---|",
           f"| base model | – | 0 | {_pct(base_task)} | {base['general_loss']:.3f} | {_pct(base['general_score'])} |"]
  for name, v in variants.items():
    experts = "–" if v["experts_per_layer"] is None else f"{v['experts_per_layer']:.2f}"
    lines.append(f"| {name} | {experts} | {v['trainable_params']:,.0f} | {_pct(v['task_score'])} | "
                 f"{v['general_loss']:.3f} | {_pct(v['general_score'])} |")
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
  added = [variants[k]["task_score"] for k in ("+ shared experts", "+ non-expert modules")]
  gain = 100 * (max(added) - relevant["task_score"])
  return [
      f"Training only the relevant experts keeps general ability best: general loss {relevant['general_loss']:.3f}"
      f" against {others[best_other]['general_loss']:.3f} for the best other variant ({best_other}) and "
      f"{fft['general_loss']:.3f} for everything. {_agrees(kept)}.",
      f"Adding shared experts or non-expert modules to the relevant experts gains {gain:+.1f} points on the task at "
      f"most (relevant experts {_pct(relevant['task_score'])}, + shared {_pct(added[0])}, + non-expert "
      f"{_pct(added[1])}, everything {_pct(fft['task_score'])}); the paper's largest such gain is +1.6 "
      f"(49.4 to 51.0). {_agrees(gain <= 5)} (criterion: at most 5 points).",
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


METHOD_STYLES = {"ESFT-Token": "o-", "ESFT-Gate": "s--", "FFT": "^:"}


def _log2_axis(ax, values: list[int], label: str) -> None:
  ax.set_xscale("log", base=2)
  ax.set_xticks(values, [str(v) for v in values])
  ax.minorticks_off()
  ax.set_xlabel(label)
  ax.grid(True, alpha=0.3)


def _task_columns(tasks: list[str]) -> tuple[str, str]:
  """Header cells and separators for one score column per task, when there are several."""
  if len(tasks) < 2:
    return "", ""
  return "".join(f" {t} |" for t in tasks), "---|" * len(tasks)


def _groups_tables(variants: dict[str, dict], results: dict) -> str:
  tasks = results["config"]["tasks"]
  header, rule = _task_columns(tasks)
  per_task = lambda scores: "".join(f" {_pct(scores[t])} |" for t in tasks) if header else ""
  active = results.get("active_experts", results["top_k"])
  lines = [f"Fine experts active per token in every model below: A = {active}.", "",
           "| group size G | model | trained fine experts per layer | trainable parameters | task score (↑) |"
           f"{header} general loss (↓) | general tasks (↑) |", f"|---|---|---|---|---|{rule}---|---|"]
  for size in results["config"]["group_sizes"]:
    base = results["bases"][str(size)]
    lines.append(f"| {size} | base, grouped | – | 0 | {_pct(_mean_task(base, results))} |{per_task(base)} "
                 f"{base['general_loss']:.3f} | {_pct(base['general_score'])} |")
    for v in (v for v in variants.values() if v["group_size"] == size):
      lines.append(f"| {size} | {v['method']} | {v['fine_experts_per_layer']:.2f} | {v['trainable_params']:,.0f} | "
                   f"{_pct(v['task_score'])} |{per_task(v['task_scores'])} {v['general_loss']:.3f} | "
                   f"{_pct(v['general_score'])} |")
  return "\n".join(lines)


def _by_method(variants: dict[str, dict], key: str) -> dict[str, dict]:
  """method -> {variants' `key` value: variant}."""
  out: dict[str, dict] = defaultdict(dict)
  for v in variants.values():
    out[v["method"]][v[key]] = v
  return out


def _groups_findings(variants: dict[str, dict], results: dict) -> list[str]:
  sizes = sorted(results["config"]["group_sizes"])
  fine, coarse = sizes[0], sizes[-1]
  methods = _by_method(variants, "group_size")
  drop = {m: by_size[fine]["task_score"] - by_size[coarse]["task_score"] for m, by_size in methods.items()}
  esft_drop = float(np.mean([drop["ESFT-Token"], drop["ESFT-Gate"]]))
  trained = {m: (methods[m][fine]["fine_experts_per_layer"], methods[m][coarse]["fine_experts_per_layer"])
             for m in ("ESFT-Token", "ESFT-Gate")}
  loss = {m: (by_size[fine]["general_loss"], by_size[coarse]["general_loss"]) for m, by_size in methods.items()}
  keep = {g: methods["FFT"][g]["general_loss"]
          - np.mean([methods[m][g]["general_loss"] for m in ("ESFT-Token", "ESFT-Gate")]) for g in (fine, coarse)}
  bases = results["bases"]
  cohesion = ", ".join(f"G={g}: {results['group_similarity'][str(g)]:.3f}" for g in sizes if g > 1)
  return [
      f"The grouping puts experts routed together side by side: mean within-group similarity {cohesion or '–'}, "
      f"against {results['pair_similarity']:.3f} for all pairs of experts.",
      f"The paper finds that ESFT loses more than FFT as groups grow. Task score from G={fine} to G={coarse}: "
      f"ESFT-Token "
      f"{_pct(methods['ESFT-Token'][fine]['task_score'])} → {_pct(methods['ESFT-Token'][coarse]['task_score'])}, "
      f"ESFT-Gate {_pct(methods['ESFT-Gate'][fine]['task_score'])} → "
      f"{_pct(methods['ESFT-Gate'][coarse]['task_score'])} (mean drop {100 * esft_drop:+.1f} points), FFT "
      f"{_pct(methods['FFT'][fine]['task_score'])} → {_pct(methods['FFT'][coarse]['task_score'])} (drop "
      f"{100 * drop['FFT']:+.1f}). {_agrees(esft_drop > drop['FFT'])}.",
      f"The paper finds that coarser experts make ESFT train more fine experts; per layer here: ESFT-Token "
      f"{trained['ESFT-Token'][0]:.2f} → "
      f"{trained['ESFT-Token'][1]:.2f}, ESFT-Gate {trained['ESFT-Gate'][0]:.2f} → {trained['ESFT-Gate'][1]:.2f} "
      f"(of {results['num_experts']}). {_agrees(all(b > a for a, b in trained.values()))}. ESFT-Gate takes "
      f"groups until their gate scores sum to p = 0.1, an absolute amount (the scores are not renormalised), and "
      f"a grouped gate is the mean of G probabilities: a token's gate weights sum to "
      f"{results['gate_mass'][str(fine)]:.3f} at G={fine} and {results['gate_mass'][str(coarse)]:.3f} at "
      f"G={coarse}, so p covers ever more of the mass as groups grow.",
      f"ESFT's edge in general ability over FFT (FFT's general loss minus ESFT's, mean of token and gate) is "
      f"{keep[fine]:+.3f} at G={fine} and {keep[coarse]:+.3f} at G={coarse}.",
      "General loss (the paper reports none for this ablation): " + ", ".join(
          f"{m} {a:.3f} → {b:.3f}" for m, (a, b) in loss.items()) + f". Grouping alone changes the base (the "
      f"grouped gate averages its members' probabilities and runs whole groups): its general loss is "
      f"{bases[str(fine)]['general_loss']:.3f} at G={fine} and {bases[str(coarse)]['general_loss']:.3f} at "
      f"G={coarse} before any fine-tuning.",
  ]


def _plot_groups(variants: dict[str, dict], results: dict, path: Path) -> None:
  """Like the paper's Figure 7: one task-score panel per task, then general loss and trained experts."""
  sizes = sorted(results["config"]["group_sizes"])
  tasks = results["config"]["tasks"]
  fig = figure(4 * (len(tasks) + 2), 4)
  axes = fig.subplots(1, len(tasks) + 2)
  ax_loss, ax_experts = axes[-2:]
  bases = [results["bases"][str(g)] for g in sizes]
  for method, by_size in _by_method(variants, "group_size").items():
    runs = [by_size[g] for g in sizes]
    for ax, task in zip(axes, tasks):
      ax.plot(sizes, [100 * v["task_scores"][task] for v in runs], METHOD_STYLES[method], label=method)
    ax_loss.plot(sizes, [v["general_loss"] for v in runs], METHOD_STYLES[method], label=method)
    ax_experts.plot(sizes, [v["fine_experts_per_layer"] for v in runs], METHOD_STYLES[method], label=method)
  for ax, task in zip(axes, tasks):
    ax.plot(sizes, [100 * b[task] for b in bases], "x", color="gray", label="base, grouped")
    ax.set_ylabel(f"{task} score")
  ax_loss.plot(sizes, [b["general_loss"] for b in bases], "x", color="gray", label="base, grouped")
  ax_loss.set_ylabel("held-out general loss")
  ax_experts.set_yscale("log", base=2)
  ax_experts.set_ylabel("trained fine experts per layer")
  for ax in axes:
    _log2_axis(ax, sizes, "group size G")
    ax.legend(fontsize="x-small")
  fig.suptitle("Figure 7: expert granularity by grouping, ESFT on whole groups")
  save_figure(fig, path)


def _scratch_tables(variants: dict[str, dict], results: dict) -> str:
  lines = ["| base | experts × width, top-k | shared width | base task score | base general loss | top-k gate "
           "share | ESFT-Token selects | ESFT-Gate selects |", "|---|---|---|---|---|---|---|---|"]
  methods = defaultdict(dict)
  for v in variants.values():
    methods[v["variant"].rsplit(" ", 1)[0]][v["method"]] = v
  for name, base in results["bases"].items():
    runs = methods[name]
    lines.append(f"| {name} | {base['experts']} × {base['width']}, top-{base['top_k']} | {base['shared_width']} | "
                 f"{_pct(_mean_task(base, results))} | {base['general_loss']:.3f} | "
                 f"{np.mean(list(base['concentration'].values())):.3f} | "
                 f"{_pct(runs['ESFT-Token']['selected_fraction'])}% | "
                 f"{_pct(runs['ESFT-Gate']['selected_fraction'])}% |")
  lines += ["", "| base | method | trained experts per layer | trainable parameters | task score (↑) | "
                "general loss (↓) | general tasks (↑) |", "|---|---|---|---|---|---|---|"]
  for name, runs in methods.items():
    for method, v in runs.items():
      lines.append(f"| {name} | {method} | {v['fine_experts_per_layer']:.2f} | {v['trainable_params']:,.0f} | "
                   f"{_pct(v['task_score'])} | {v['general_loss']:.3f} | {_pct(v['general_score'])} |")
  return "\n".join(lines)


def _families(variants: dict[str, dict]) -> dict[int, dict[str, dict[int, dict]]]:
  """shared width -> method -> experts -> variant (means over tasks)."""
  out: dict[int, dict[str, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
  for v in variants.values():
    out[v["shared_width"]][v["method"]][v["experts"]] = v
  return out


def _scratch_findings(variants: dict[str, dict], results: dict) -> list[str]:
  """Per family (shared width), the coarsest base against the finest; then with against without shared."""
  bases = {(b["experts"], b["shared_width"]): b for b in results["bases"].values()}
  rise = lambda v: v["general_loss"] - bases[v["experts"], v["shared_width"]]["general_loss"]
  esft = lambda runs, e, key: float(np.mean([runs[m][e][key] for m in ("ESFT-Token", "ESFT-Gate")]))
  families = _families(variants)
  lines = []
  for shared, methods in sorted(families.items()):
    experts = sorted(methods["FFT"])
    if len(experts) < 2:
      continue
    few, many = experts[0], experts[-1]
    family = f"With a shared expert of width {shared}" if shared else "Without a shared expert"
    token, gate, fft = methods["ESFT-Token"], methods["ESFT-Gate"], methods["FFT"]
    esft_rise = {e: float(np.mean([rise(token[e]), rise(gate[e])])) for e in (few, many)}
    esft_drop = esft(methods, many, "task_score") - esft(methods, few, "task_score")
    fft_drop = fft[many]["task_score"] - fft[few]["task_score"]
    lines += [
        f"{family}, {few} → {many} experts: the gate share of the task's busiest k experts (uniform "
        f"{token[few]['top_k'] / few:.2f}) goes {token[few]['concentration']:.3f} → "
        f"{token[many]['concentration']:.3f}. The paper's premise is that finer experts specialise more: "
        f"{_agrees(token[many]['concentration'] > token[few]['concentration'])} by this measure.",
        f"{family}: ESFT selects {_pct(token[few]['selected_fraction'])}% → {_pct(token[many]['selected_fraction'])}%"
        f" of the experts (token), {_pct(gate[few]['selected_fraction'])}% → {_pct(gate[many]['selected_fraction'])}%"
        f" (gate), and trains {token[few]['trainable_params']:,.0f} → {token[many]['trainable_params']:,.0f} "
        f"parameters (token; at least one expert per layer, so never below 1/E).",
        f"{family}: ESFT's general loss rises over its own base by {esft_rise[few]:+.3f} at {few} experts and "
        f"{esft_rise[many]:+.3f} at {many} (mean of token and gate; FFT: {rise(fft[few]):+.3f} and "
        f"{rise(fft[many]):+.3f}). The paper's case for fine-grained experts is that ESFT then trains only what "
        f"the task uses and keeps general ability: {_agrees(esft_rise[many] < esft_rise[few])}.",
        f"{family}: task score, ESFT (mean of token and gate) {_pct(esft(methods, few, 'task_score'))} → "
        f"{_pct(esft(methods, many, 'task_score'))}, FFT {_pct(fft[few]['task_score'])} → "
        f"{_pct(fft[many]['task_score'])} (bases {_pct(_mean_task(bases[few, shared], results))} → "
        f"{_pct(_mean_task(bases[many, shared], results))}). The paper finds coarse experts hurt ESFT more than FFT: "
        f"{_agrees(esft_drop > fft_drop)} (ESFT gains {100 * esft_drop:+.1f} points from the finer experts, FFT "
        f"{100 * fft_drop:+.1f}).",
        f"{family}: the bases themselves differ: general loss {bases[few, shared]['general_loss']:.3f} at {few} "
        f"experts, {bases[many, shared]['general_loss']:.3f} at {many}, after the same pretraining.",
    ]
  if len(families) == 2:
    (bare, shared) = sorted(families)
    common = sorted(set(families[bare]["FFT"]) & set(families[shared]["FFT"]))
    pairs = ", ".join(f"{e} experts {rise(families[bare]['ESFT-Token'][e]):+.3f} / "
                      f"{rise(families[shared]['ESFT-Token'][e]):+.3f}" for e in common)
    lines.append(f"ESFT-Token's general loss rise over the base without / with the shared expert: {pairs}.")
  return lines


def _mean_task(scores: dict, results: dict) -> float:
  return float(np.mean([scores[t] for t in results["config"]["tasks"]]))


def _plot_scratch(variants: dict[str, dict], results: dict, path: Path) -> None:
  bases = {(b["experts"], b["shared_width"]): b["general_loss"] for b in results["bases"].values()}
  fig = figure(11, 8)
  (ax_conc, ax_sel), (ax_task, ax_loss) = fig.subplots(2, 2)
  experts = sorted({v["experts"] for v in variants.values()})
  for shared, methods in sorted(_families(variants).items()):
    tag, color = (f"shared {shared}", "tab:orange") if shared else ("no shared", "tab:blue")
    xs = sorted(methods["FFT"])
    ax_conc.plot(xs, [methods["ESFT-Token"][e]["concentration"] for e in xs], "o-", color=color, label=tag)
    for method, style in METHOD_STYLES.items():
      label = f"{method}, {tag}"
      if method != "FFT":
        ax_sel.plot(xs, [100 * methods[method][e]["selected_fraction"] for e in xs], style, color=color, label=label)
      ax_task.plot(xs, [100 * methods[method][e]["task_score"] for e in xs], style, color=color, label=label)
      ax_loss.plot(xs, [methods[method][e]["general_loss"] - bases[e, shared] for e in xs], style, color=color,
                   label=label)
  uniform = next(iter(variants.values()))
  ax_conc.axhline(uniform["top_k"] / uniform["experts"], color="gray", linestyle=":", label="uniform routing")
  ax_conc.set_ylabel("gate share of the busiest k experts")
  ax_sel.set_ylabel("experts ESFT selects (% of the layer's)")
  ax_task.set_ylabel("task score after fine-tuning")
  ax_loss.set_ylabel("general loss: fine-tuned minus its base")
  for ax in (ax_conc, ax_sel, ax_task, ax_loss):
    _log2_axis(ax, experts, "routed experts (equal total and active parameters)")
    ax.legend(fontsize="x-small")
  fig.suptitle("Bases of other granularity, pretrained alike")
  save_figure(fig, path)


_TITLES = {"threshold": "Threshold sweep (the paper's Figure 6)",
           "what_to_train": "What to train (the paper's Table 3)",
           "random_experts": "Scored against random experts (the paper's Table 4)",
           "granularity_groups": "Expert granularity by grouping (the paper's Figure 7, appendix B)",
           "granularity_scratch": "Expert granularity from scratch (beyond the paper)"}


_INTROS = {
    "granularity_groups": """
Per MoE layer, the base's experts are grouped G at a time (greedy, exact: the G-subset of the remaining experts
with the highest mean pairwise cosine similarity of their co-occurrence rows, counted on the held-out general
text) and each group becomes one coarse expert: its members' weights side by side, gated by the mean of their
router probabilities, top-(A/G) groups per token for A active fine experts (the config's `active_experts`,
default the base's top-k; with A above k, G = 1 is the base routing to its top-A experts, as in the paper, which
keeps 1/8 of the experts active). ESFT selects and trains whole groups at the demo's p (token 0.2, gate 0.1);
"trained fine experts" counts a trained group as G. The grouped base is scored, fine-tuned and
evaluated through the same code as the demo's base.
""",
    "granularity_scratch": """
Every base splits the same routed parameters (experts × width) and active width (top-k × width) differently,
with or without a shared expert of the same width across granularities, and is pretrained like the demo's base
(same text, steps, seed; each with its own tokenizer trained on the same text). Each is scored on the tasks,
ESFT selects at the demo's p (token 0.2, gate 0.1), and FFT runs beside it. "Top-k gate share" is the share of
the task's gate mass on its k busiest experts, mean over layers; with k/E fixed, a uniform router scores k/E.
""",
}


def write_ablation_report(root: Path, results: dict) -> Path:
  name, config = results["ablation"], results["config"]
  variants = _by_variant(results["rows"])
  table = None
  if name == "threshold":
    finding_lines = _threshold_findings(variants)
    _plot_threshold(variants, root / FIGURE_PNG)
  elif name == "granularity_groups":
    finding_lines, table = _groups_findings(variants, results), _groups_tables(variants, results)
    _plot_groups(variants, results, root / FIGURE_PNG)
  elif name == "granularity_scratch":
    finding_lines, table = _scratch_findings(variants, results), _scratch_tables(variants, results)
    _plot_scratch(variants, results, root / FIGURE_PNG)
  else:
    finding_lines = (_what_to_train_findings if name == "what_to_train" else _random_findings)(variants)
    _plot_bars(variants, _TITLES[name], root / FIGURE_PNG)
  config_file = results.get("config_file", f"{name}.json")
  text = f"""# Ablation: {_TITLES[name]}

Preset `{results['preset']}` ({results['num_experts']} routed experts, top-{results['top_k']}); tasks
{', '.join(config['tasks'])}. Generated with `esft-jax ablate configs/ablations/{config_file} --preset
{results['preset']}`. Scores are percentages, mean over the tasks; "general tasks" is the mean exact match on
the demo's general instruction families (general ability); general loss is on held-out standard-library text.
{_INTROS.get(name, '')}
{table or _table(variants, results['base'], config['tasks'])}

## Findings

""" + "\n".join(f"- {line}" for line in finding_lines) + f"""

![]({FIGURE_PNG})
"""
  atomic_write_text(root / "REPORT.md", text)
  return root / "REPORT.md"
