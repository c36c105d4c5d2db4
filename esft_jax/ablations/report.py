"""REPORT.md, results.json and the figures of one ablation over seeds: a table of every variant (mean ± std over
seeds of the mean over the ablation's tasks), the findings, each tested beyond the spread and set beside the
paper's number where it gives one, and figures with error bars and the base's level. The granularity ablations
also draw the paper's Figure 7 view of both (ESFT relative to FFT against granularity) into one figure."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np

from esft_jax.analysis.figures import figure, save_figure
from esft_jax.demo.spread import finding, mean_std, pm
from esft_jax.files import atomic_write_text

FIGURE_PNG = "figure.png"
GRANULARITY_PNG = "granularity.png"  # under OUT/ablations: the grouping and from-scratch bases in one figure

# The paper's numbers the findings are set against. Table 3 (specialised, general ability; ESFT-Token p=0.2):
PAPER_TABLE3 = {"relevant experts": (49.4, 61.5), "+ shared experts": (49.8, 60.7),
                "+ shared + non-expert": (50.8, 60.3), "shared experts only": (47.4, 61.2),
                "shared + non-expert": (49.0, 60.0), "everything (FFT)": (51.0, 58.8)}
PAPER_TABLE3_BASE = (33.8, 62.4)
# Table 4: random minus scored experts, mean task score over the eight tasks.
PAPER_TABLE4_DELTA = {"token": -2.8, "gate": -4.4}

Table = dict[str, list[float]]  # seed -> one value per task, in the ablation's task order


class Cells:
  """An ablation's rows over seeds: per variant and metric, a value per seed and task."""

  def __init__(self, results: dict):
    self.results = results
    self.seeds = [str(s) for s in results["seeds"]]
    self.tasks = list(results["tasks"])
    self.rows = {(str(r["seed"]), r["task"], r["variant"]): r
                 for s in self.seeds for r in results["per_seed"][s]["rows"]}
    self.variants = list(dict.fromkeys(r["variant"] for r in results["per_seed"][self.seeds[0]]["rows"]))

  def fields(self, variant: str) -> dict:
    """The variant's fields as its first row holds them."""
    return self.rows[self.seeds[0], self.tasks[0], variant]

  def get(self, variant: str, key: str) -> Table:
    return {s: [self.rows[s, t, variant][key] for t in self.tasks] for s in self.seeds}

  def base(self, key: str | None = None, scores: Callable[[str], dict] | None = None) -> Table:
    """The base's task scores (key None) or its `key` (the same for every task) per seed; `scores(seed)` picks
    another base's evaluation (default: the seed's aligned base)."""
    scores = scores or (lambda s: self.results["per_seed"][s]["base"])
    return {s: [scores(s)[key or t] for t in self.tasks] for s in self.seeds}


def combine(fn: Callable[..., float], *tables: Table) -> Table:
  """`fn` of the tables' values, seed by seed and task by task."""
  return {s: [float(fn(*values)) for values in zip(*(t[s] for t in tables))] for s in tables[0]}


def seed_means(table: Table) -> list[float]:
  return [float(np.mean(v)) for v in table.values()]


def cell(table: Table) -> tuple[float, float]:
  """Mean and std over seeds of each seed's mean over tasks."""
  return mean_std(seed_means(table))


def _pm(table: Table, scale: float = 100, digits: int = 1) -> str:
  return pm(seed_means(table), scale, digits)


def _esft(cells: Cells, prefix: str, key: str) -> Table:
  """Mean of ESFT-Token and ESFT-Gate, per seed and task."""
  return combine(lambda a, b: (a + b) / 2, cells.get(f"{prefix} ESFT-Token", key),
                 cells.get(f"{prefix} ESFT-Gate", key))


def _table(cells: Cells, paper: Callable[[str], str] | None = None, paper_header: str = "") -> str:
  """Every variant beside the base: experts per layer, trainable parameters, task score, general loss and
  general-benchmark score, mean ± std over seeds."""
  extra = f" {paper_header} |" if paper else ""
  lines = ["| variant | experts per layer | trainable parameters | task score (↑) | general loss (↓) | "
           f"general tasks (↑) |{extra}", "|---|---|---|---|---|---|" + ("---|" if paper else ""),
           f"| base model | – | 0 | {_pm(cells.base())} | {_pm(cells.base('general_loss'), 1, 3)} | "
           f"{_pm(cells.base('general_score'))} |" + (f" {paper('base model')} |" if paper else "")]
  for name in cells.variants:
    per_layer = cells.fields(name)["experts_per_layer"]
    experts = "–" if per_layer is None else f"{cell(cells.get(name, 'experts_per_layer'))[0]:.2f}"
    lines.append(f"| {name} | {experts} | {cell(cells.get(name, 'trainable_params'))[0]:,.0f} | "
                 f"{_pm(cells.get(name, 'task_score'))} | {_pm(cells.get(name, 'general_loss'), 1, 3)} | "
                 f"{_pm(cells.get(name, 'general_score'))} |" + (f" {paper(name)} |" if paper else ""))
  return "\n".join(lines)


def _over_seeds(cells: Cells) -> str:
  """What a figure's points are, for its title."""
  n = len(cells.seeds)
  return f"mean ± std over {n} seeds" if n > 1 else "one seed"


def _slope(x: list[float], y: list[float]) -> float:
  return float(np.polyfit(x, y, 1)[0]) if len(set(x)) > 1 else 0.0


def _threshold_findings(cells: Cells) -> list[dict]:
  esft = [v for v in cells.variants if cells.fields(v)["score"] in ("token", "gate")]
  lora = [v for v in cells.variants if cells.fields(v)["score"] == "lora"]

  def slope(key: str) -> Table:  # per seed and task, least squares over the token and gate runs
    x = [cells.get(v, "experts_per_layer") for v in esft]
    y = [cells.get(v, key) for v in esft]
    return {s: [_slope([xv[s][i] for xv in x], [yv[s][i] for yv in y]) for i in range(len(cells.tasks))]
            for s in cells.seeds}

  mean_of = lambda variants, key: combine(lambda *v: np.mean(v), *(cells.get(v, key) for v in variants))

  def ends(key: str, scale: float, digits: int) -> str:  # each score's smallest p against its largest
    return ", ".join(
        f"ESFT-{score.title()} p={cells.fields(runs[0])['p']} {_pm(cells.get(runs[0], key), scale, digits)} → "
        f"p={cells.fields(runs[-1])['p']} {_pm(cells.get(runs[-1], key), scale, digits)}"
        for score in ("token", "gate")
        for runs in [sorted((v for v in esft if cells.fields(v)["score"] == score),
                            key=lambda v: cells.fields(v)["p"])])

  return [
      finding("Training more experts (larger p) costs general ability: general loss rises with the trained experts "
              "per layer", slope("general_loss"),
              f"general loss {ends('general_loss', 1, 3)}; the margin is the least-squares slope over the token "
              "and gate runs, per seed and task", unit="loss per expert per layer", scale=1),
      finding("Task score rises with the trained experts per layer (the paper: it rises and saturates by p = 0.2 for "
              "ESFT-Token and p = 0.1 for ESFT-Gate, the defaults; Token peaks at p = 0.5, Gate at p = 0.3)",
              slope("task_score"), f"task score {ends('task_score', 100, 1)}; the margin is the least-squares "
              "slope over the token and gate runs", unit="points per expert per layer"),
      finding("ESFT scores above LoRA on the task, mean over the sweep (the paper: ESFT-Token and ESFT-Gate beat LoRA "
              "at every point of it)",
              combine(lambda a, b: a - b, mean_of(esft, "task_score"), mean_of(lora, "task_score")),
              f"ESFT {_pm(mean_of(esft, 'task_score'))} over its {len(esft)} thresholds, LoRA "
              f"{_pm(mean_of(lora, 'task_score'))} over its {len(lora)} ranks"),
  ]


def _what_to_train_findings(cells: Cells) -> list[dict]:
  get = cells.get
  relevant = "relevant experts"
  others = [v for v in cells.variants if v != relevant]
  best_other = min(others, key=lambda v: cell(get(v, "general_loss"))[0])
  diff = lambda a, b, key: combine(lambda x, y: x - y, get(a, key), get(b, key))
  loss = lambda v: _pm(get(v, "general_loss"), 1, 3)
  task = lambda v: _pm(get(v, "task_score"))
  paper_gain = PAPER_TABLE3["everything (FFT)"][0] - PAPER_TABLE3[relevant][0]
  return [
      finding("Training only the relevant experts keeps general ability best of the trained variants: its general "
              "loss is below every other's (the paper: general 61.5, the next best 61.2 for shared experts only)",
              combine(lambda r, *o: min(o) - r, get(relevant, "general_loss"),
                      *(get(v, "general_loss") for v in others)),
              f"general loss: relevant experts {loss(relevant)}, the best other ({best_other}) {loss(best_other)}, "
              f"everything {loss('everything (FFT)')}", unit="loss", scale=1),
      finding(f"Training more raises the task score: everything (FFT) scores above the relevant experts (the paper: "
              f"{PAPER_TABLE3['everything (FFT)'][0]} against {PAPER_TABLE3[relevant][0]}, {paper_gain:+.1f} points)",
              diff("everything (FFT)", relevant, "task_score"),
              f"task score: relevant experts {task(relevant)}, + shared {task('+ shared experts')}, + shared + "
              f"non-expert {task('+ shared + non-expert')}, everything {task('everything (FFT)')}; the gain here is "
              f"{100 * cell(diff('everything (FFT)', relevant, 'task_score'))[0]:+.1f} points against the paper's "
              f"{paper_gain:+.1f}"),
      finding("Training the shared experts costs general ability: + shared experts has a higher general loss than "
              "the relevant experts alone (the paper: general 61.5 → 60.7)",
              diff("+ shared experts", relevant, "general_loss"),
              f"general loss: relevant experts {loss(relevant)}, + shared experts {loss('+ shared experts')}",
              unit="loss", scale=1),
  ]


def _random_findings(cells: Cells) -> list[dict]:
  score = cells.results["config"]["score"]
  delta = combine(lambda a, b: a - b, cells.get("random", "task_score"), cells.get("scored", "task_score"))
  return [finding(
      f"Experts chosen by their {score} scores beat as many drawn at random (one draw per seed) on the task (the "
      f"paper: random is {-PAPER_TABLE4_DELTA[score]:.1f} points behind for ESFT-{score.title()})",
      combine(lambda d: -d, delta),
      f"task score: scored {_pm(cells.get('scored', 'task_score'))}, random {_pm(cells.get('random', 'task_score'))};"
      f" random minus scored {100 * cell(delta)[0]:+.1f} points here against the paper's "
      f"{PAPER_TABLE4_DELTA[score]:+.1f}; general loss: scored {_pm(cells.get('scored', 'general_loss'), 1, 3)}, "
      f"random {_pm(cells.get('random', 'general_loss'), 1, 3)}")]


def _errorbar(ax, x, tables: list[Table], scale: float, style: str, **kwargs) -> None:
  """Mean over seeds with ± std error bars (none with one seed)."""
  stats = np.array([cell(t) for t in tables]) * scale
  ax.errorbar(x, stats[:, 0], yerr=stats[:, 1] if any(stats[:, 1]) else None, fmt=style, capsize=3, **kwargs)


def _base_level(ax, table: Table, scale: float, label: str = "base") -> None:
  """The base's level, its std over seeds as a band."""
  mean, std = np.array(cell(table)) * scale
  ax.axhline(mean, color="gray", linestyle="--", linewidth=1, label=label)
  if std:
    ax.axhspan(mean - std, mean + std, color="gray", alpha=0.15)


def _plot_threshold(cells: Cells, path: Path) -> None:
  fig = figure(10, 4)
  ax_task, ax_loss = fig.subplots(1, 2)
  for score, style in (("token", "o-"), ("gate", "s--")):
    runs = sorted((v for v in cells.variants if cells.fields(v)["score"] == score),
                  key=lambda v: cell(cells.get(v, "experts_per_layer"))[0])
    x = [cell(cells.get(v, "experts_per_layer"))[0] for v in runs]
    _errorbar(ax_task, x, [cells.get(v, "task_score") for v in runs], 100, style, label=f"ESFT-{score.title()}")
    _errorbar(ax_loss, x, [cells.get(v, "general_loss") for v in runs], 1, style, label=f"ESFT-{score.title()}")
  for v in (v for v in cells.variants if cells.fields(v)["score"] == "lora"):
    for ax, key, scale in ((ax_task, "task_score", 100), (ax_loss, "general_loss", 1)):
      value = scale * cell(cells.get(v, key))[0]
      ax.axhline(value, color="tab:green", linestyle=":", linewidth=1)
      ax.annotate(f"LoRA r={cells.fields(v)['rank']}", (ax.get_xlim()[0], value), fontsize="x-small",
                  color="tab:green")
  _base_level(ax_task, cells.base(), 100)
  _base_level(ax_loss, cells.base("general_loss"), 1)
  ax_task.set_ylabel("task score (mean over tasks)")
  ax_loss.set_ylabel("held-out general loss")
  for ax in (ax_task, ax_loss):
    ax.set_xlabel("average trained experts per layer")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
  fig.suptitle(f"Figure 6: threshold p, trained experts and performance ({_over_seeds(cells)})")
  save_figure(fig, path)


def _plot_bars(cells: Cells, title: str, path: Path) -> None:
  fig = figure(10, 4)
  ax_task, ax_loss = fig.subplots(1, 2)
  names = cells.variants
  for ax, key, scale, base in ((ax_task, "task_score", 100, cells.base()),
                               (ax_loss, "general_loss", 1, cells.base("general_loss"))):
    stats = np.array([cell(cells.get(v, key)) for v in names]) * scale
    ax.barh(names, stats[:, 0], xerr=stats[:, 1] if any(stats[:, 1]) else None, capsize=3)
    ax.axvline(scale * cell(base)[0], color="gray", linestyle="--", linewidth=1, label="base")
    ax.invert_yaxis()
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize="small")
  ax_task.set_xlabel("task score (mean over tasks)")
  ax_loss.set_xlabel("held-out general loss (lower is better)")
  ax_loss.set_yticks([])
  low = min(cell(cells.get(v, "general_loss"))[0] for v in names)
  low = min(low, cell(cells.base("general_loss"))[0])
  ax_loss.set_xlim(left=low - 0.05 * abs(low))
  fig.suptitle(f"{title} ({_over_seeds(cells)})")
  save_figure(fig, path)


METHODS = ("ESFT-Token", "ESFT-Gate", "FFT")
METHOD_STYLES = {"ESFT-Token": "o-", "ESFT-Gate": "s--", "FFT": "^:"}


def _log2_axis(ax, values: list[int], label: str) -> None:
  ax.set_xscale("log", base=2)
  ax.set_xticks(values, [str(v) for v in values])
  ax.minorticks_off()
  ax.set_xlabel(label)
  ax.grid(True, alpha=0.3)


def _groups_base(cells: Cells, size: int, key: str | None = None) -> Table:
  return cells.base(key, lambda s: cells.results["per_seed"][s]["bases"][str(size)])


def _groups_table(cells: Cells) -> str:
  results = cells.results
  active = results["per_seed"][cells.seeds[0]]["active_experts"]
  lines = [f"Fine experts active per token in every model below: A = {active}.",
           "", "| group size G | model | trained fine experts per layer | trainable parameters | task score (↑) | "
           "general loss (↓) | general tasks (↑) |", "|---|---|---|---|---|---|---|"]
  for size in results["config"]["group_sizes"]:
    lines.append(f"| {size} | base, grouped | – | 0 | {_pm(_groups_base(cells, size))} | "
                 f"{_pm(_groups_base(cells, size, 'general_loss'), 1, 3)} | "
                 f"{_pm(_groups_base(cells, size, 'general_score'))} |")
    for method in METHODS:
      v = f"G={size} {method}"
      lines.append(f"| {size} | {method} | {cell(cells.get(v, 'fine_experts_per_layer'))[0]:.2f} | "
                   f"{cell(cells.get(v, 'trainable_params'))[0]:,.0f} | {_pm(cells.get(v, 'task_score'))} | "
                   f"{_pm(cells.get(v, 'general_loss'), 1, 3)} | {_pm(cells.get(v, 'general_score'))} |")
  return "\n".join(lines)


def _groups_findings(cells: Cells) -> tuple[list[dict], list[str]]:
  results = cells.results
  sizes = sorted(results["config"]["group_sizes"])
  fine, coarse = f"G={sizes[0]}", f"G={sizes[-1]}"
  get = cells.get
  esft_drop = combine(lambda a, b: a - b, _esft(cells, fine, "task_score"), _esft(cells, coarse, "task_score"))
  fft_drop = combine(lambda a, b: a - b, get(f"{fine} FFT", "task_score"), get(f"{coarse} FFT", "task_score"))
  trained = combine(lambda a, b: a - b, _esft(cells, coarse, "fine_experts_per_layer"),
                    _esft(cells, fine, "fine_experts_per_layer"))
  score = lambda prefix, m: _pm(get(f"{prefix} {m}", "task_score"))
  per_seed = results["per_seed"]
  found = [finding(
      f"ESFT loses more task score than FFT as groups grow (the paper's Figure 7, on math: ESFT degrades more than "
      f"FFT from G = 1 to 4)", combine(lambda e, f: e - f, esft_drop, fft_drop),
      f"task score {fine} → {coarse}: ESFT-Token {score(fine, 'ESFT-Token')} → {score(coarse, 'ESFT-Token')}, "
      f"ESFT-Gate {score(fine, 'ESFT-Gate')} → {score(coarse, 'ESFT-Gate')}, FFT {score(fine, 'FFT')} → "
      f"{score(coarse, 'FFT')}; drop ESFT {_pm(esft_drop)}, FFT {_pm(fft_drop)}")]
  found.append(finding(
      "Coarser experts make ESFT train more fine experts (the paper's Figure 7: the trained-expert count rises with "
      "the group size)", trained,
      f"trained fine experts per layer (mean of token and gate) {fine} "
      f"{_pm(_esft(cells, fine, 'fine_experts_per_layer'), 1, 2)}"
      f", {coarse} {_pm(_esft(cells, coarse, 'fine_experts_per_layer'), 1, 2)} (of {results['num_experts']})",
      unit="fine experts per layer", scale=1))
  if sizes[-1] > 1:
    found.append(finding(
        "The grouping puts experts routed together side by side: within-group similarity above that of all pairs",
        {s: [per_seed[s]["group_similarity"][str(sizes[-1])] - per_seed[s]["pair_similarity"]] for s in cells.seeds},
        f"mean cosine similarity of co-occurrence within groups of {sizes[-1]} "
        f"{pm([per_seed[s]['group_similarity'][str(sizes[-1])] for s in cells.seeds], 1, 3)}, all pairs "
        f"{pm([per_seed[s]['pair_similarity'] for s in cells.seeds], 1, 3)}", unit="cosine", scale=1))
  mass = lambda size: pm([per_seed[s]["gate_mass"][str(size)] for s in cells.seeds], 1, 3)
  notes = [
      f"ESFT-Gate takes groups until their gate scores sum to p = 0.1, an absolute amount (the scores are not "
      f"renormalised), and a grouped gate is the mean of G probabilities: a token's gate weights sum to "
      f"{mass(sizes[0])} at {fine} and {mass(sizes[-1])} at {coarse}, so p covers ever more of the mass as groups "
      "grow.",
      f"Grouping alone changes the base (the grouped gate averages its members' probabilities and runs whole "
      f"groups): its general loss is {_pm(_groups_base(cells, sizes[0], 'general_loss'), 1, 3)} at {fine} and "
      f"{_pm(_groups_base(cells, sizes[-1], 'general_loss'), 1, 3)} at {coarse} before any fine-tuning; its task "
      f"score {_pm(_groups_base(cells, sizes[0]))} and {_pm(_groups_base(cells, sizes[-1]))}.",
  ]
  return found, notes


def _plot_groups(cells: Cells, path: Path) -> None:
  """Like the paper's Figure 7: task score, general loss and trained fine experts against G, with the grouped
  bases' levels."""
  sizes = sorted(cells.results["config"]["group_sizes"])
  fig = figure(13, 4)
  ax_task, ax_loss, ax_experts = fig.subplots(1, 3)
  for method in METHODS:
    variants = [f"G={g} {method}" for g in sizes]
    for ax, key, scale in ((ax_task, "task_score", 100), (ax_loss, "general_loss", 1),
                           (ax_experts, "fine_experts_per_layer", 1)):
      _errorbar(ax, sizes, [cells.get(v, key) for v in variants], scale, METHOD_STYLES[method], label=method)
  for ax, key, scale in ((ax_task, None, 100), (ax_loss, "general_loss", 1)):
    _errorbar(ax, sizes, [_groups_base(cells, g, key) for g in sizes], scale, "x", color="gray",
              label="base, grouped")
  ax_task.set_ylabel("task score (mean over tasks)")
  ax_loss.set_ylabel("held-out general loss")
  ax_experts.set_yscale("log", base=2)
  ax_experts.set_ylabel("trained fine experts per layer")
  for ax in (ax_task, ax_loss, ax_experts):
    _log2_axis(ax, sizes, "group size G")
    ax.legend(fontsize="x-small")
  fig.suptitle(f"Figure 7: expert granularity by grouping, ESFT on whole groups ({_over_seeds(cells)})")
  save_figure(fig, path)


def _scratch_bases(cells: Cells) -> dict[int, list[str]]:
  """shared width -> base names from fewest to most experts."""
  bases = cells.results["per_seed"][cells.seeds[0]]["bases"]
  families: dict[int, list[str]] = defaultdict(list)
  for name, base in sorted(bases.items(), key=lambda item: item[1]["experts"]):
    families[base["shared_width"]].append(name)
  return dict(sorted(families.items()))


def _scratch_base(cells: Cells, name: str, key: str | None = None) -> Table:
  return cells.base(key, lambda s: cells.results["per_seed"][s]["bases"][name])


def _scratch_table(cells: Cells) -> str:
  lines = ["| base | experts × width, top-k | shared width | base task score | base general loss | top-k gate "
           "share | ESFT-Token selects (%) | ESFT-Gate selects (%) |", "|---|---|---|---|---|---|---|---|"]
  for names in _scratch_bases(cells).values():
    for name in names:
      b = cells.results["per_seed"][cells.seeds[0]]["bases"][name]
      lines.append(f"| {name} | {b['experts']} × {b['width']}, top-{b['top_k']} | {b['shared_width']} | "
                   f"{_pm(_scratch_base(cells, name))} | {_pm(_scratch_base(cells, name, 'general_loss'), 1, 3)} | "
                   f"{_pm(cells.get(f'{name} FFT', 'concentration'), 1, 3)} | "
                   f"{_pm(cells.get(f'{name} ESFT-Token', 'selected_fraction'))} | "
                   f"{_pm(cells.get(f'{name} ESFT-Gate', 'selected_fraction'))} |")
  lines += ["", "| base | method | trained experts per layer | trainable parameters | task score (↑) | "
                "general loss (↓) | general tasks (↑) |", "|---|---|---|---|---|---|---|"]
  for names in _scratch_bases(cells).values():
    for name in names:
      for method in METHODS:
        v = f"{name} {method}"
        lines.append(f"| {name} | {method} | {cell(cells.get(v, 'fine_experts_per_layer'))[0]:.2f} | "
                     f"{cell(cells.get(v, 'trainable_params'))[0]:,.0f} | {_pm(cells.get(v, 'task_score'))} | "
                     f"{_pm(cells.get(v, 'general_loss'), 1, 3)} | {_pm(cells.get(v, 'general_score'))} |")
  return "\n".join(lines)


def _scratch_findings(cells: Cells) -> list[dict]:
  """Per family (shared width), the coarsest base against the finest."""
  found = []
  for shared, names in _scratch_bases(cells).items():
    if len(names) < 2:
      continue
    few, many = names[0], names[-1]
    family = f"with a shared expert of width {shared}" if shared else "without a shared expert"
    span = f"{cells.fields(f'{few} FFT')['experts']} → {cells.fields(f'{many} FFT')['experts']} experts, {family}"
    conc = lambda name: cells.get(f"{name} FFT", "concentration")
    rise = lambda name: combine(lambda e, b: e - b, _esft(cells, name, "general_loss"),
                                _scratch_base(cells, name, "general_loss"))
    gain = lambda variant_few, variant_many: combine(lambda a, b: b - a, variant_few, variant_many)
    esft_gain = gain(_esft(cells, few, "task_score"), _esft(cells, many, "task_score"))
    fft_gain = gain(cells.get(f"{few} FFT", "task_score"), cells.get(f"{many} FFT", "task_score"))
    uniform = cells.fields(f"{few} FFT")["top_k"] / cells.fields(f"{few} FFT")["experts"]
    found += [
        finding(f"Finer experts specialise more ({span}): the task's busiest k experts carry more of its gate mass",
                combine(lambda a, b: b - a, conc(few), conc(many)),
                f"top-k gate share {_pm(conc(few), 1, 3)} → {_pm(conc(many), 1, 3)} (uniform {uniform:.3f})",
                unit="share", scale=1),
        finding(f"Finer experts let ESFT keep more general ability ({span}): its general loss rises less over its "
                "own base", combine(lambda a, b: a - b, rise(few), rise(many)),
                f"ESFT's rise over the base (mean of token and gate) {_pm(rise(few), 1, 3)} → "
                f"{_pm(rise(many), 1, 3)}",
                unit="loss", scale=1),
        finding(f"Coarse experts hurt ESFT more than FFT ({span}; the paper's Figure 7 claim, on bases pretrained "
                "at each granularity)", combine(lambda e, f: e - f, esft_gain, fft_gain),
                f"task score ESFT (mean of token and gate) {_pm(_esft(cells, few, 'task_score'))} → "
                f"{_pm(_esft(cells, many, 'task_score'))}, FFT {_pm(cells.get(f'{few} FFT', 'task_score'))} → "
                f"{_pm(cells.get(f'{many} FFT', 'task_score'))}, bases {_pm(_scratch_base(cells, few))} → "
                f"{_pm(_scratch_base(cells, many))}"),
    ]
  return found


def _plot_scratch(cells: Cells, path: Path) -> None:
  fig = figure(11, 8)
  (ax_conc, ax_sel), (ax_task, ax_loss) = fig.subplots(2, 2)
  all_experts = set()
  for shared, names in _scratch_bases(cells).items():
    tag, color = (f"shared {shared}", "tab:orange") if shared else ("no shared", "tab:blue")
    xs = [cells.fields(f"{n} FFT")["experts"] for n in names]
    all_experts |= set(xs)
    _errorbar(ax_conc, xs, [cells.get(f"{n} FFT", "concentration") for n in names], 1, "o-", color=color, label=tag)
    for method, style in METHOD_STYLES.items():
      label = f"{method}, {tag}"
      if method != "FFT":
        _errorbar(ax_sel, xs, [cells.get(f"{n} {method}", "selected_fraction") for n in names], 100, style,
                  color=color, label=label)
      _errorbar(ax_task, xs, [cells.get(f"{n} {method}", "task_score") for n in names], 100, style, color=color,
                label=label)
      _errorbar(ax_loss, xs, [combine(lambda e, b: e - b, cells.get(f"{n} {method}", "general_loss"),
                                      _scratch_base(cells, n, "general_loss")) for n in names], 1, style,
                color=color, label=label)
    _errorbar(ax_task, xs, [_scratch_base(cells, n) for n in names], 100, "x", color=color, label=f"base, {tag}")
  first = cells.fields(cells.variants[0])
  ax_conc.axhline(first["top_k"] / first["experts"], color="gray", linestyle=":", label="uniform routing")
  ax_loss.axhline(0, color="gray", linestyle="--", linewidth=1, label="its base")
  ax_conc.set_ylabel("gate share of the busiest k experts")
  ax_sel.set_ylabel("experts ESFT selects (% of the layer's)")
  ax_task.set_ylabel("task score after fine-tuning")
  ax_loss.set_ylabel("general loss: fine-tuned minus its base")
  for ax in (ax_conc, ax_sel, ax_task, ax_loss):
    _log2_axis(ax, sorted(all_experts), "routed experts (equal total and active parameters)")
    ax.legend(fontsize="x-small")
  fig.suptitle(f"Bases of other granularity, pretrained alike ({_over_seeds(cells)})")
  save_figure(fig, path)


def granularity_curves(results: dict) -> dict[str, tuple[list[int], Table, Table]]:
  """The paper's Figure 7 view of a granularity ablation: per line (ESFT method, and the base family for bases
  from scratch), the routed experts per layer (equal total parameters across a line) and, at each, ESFT's task
  score and general loss minus FFT's, per seed and task."""
  cells = Cells(results)
  if results["ablation"] == "granularity_groups":
    sizes = sorted(results["config"]["group_sizes"], reverse=True)
    families = {"grouped": [f"G={g}" for g in sizes]}
  else:
    families = {f"from scratch, shared {s}" if s else "from scratch": names
                for s, names in _scratch_bases(cells).items()}
  curves = {}
  for family, prefixes in families.items():
    x = [cells.fields(f"{p} FFT")["routed_experts" if "routed_experts" in cells.fields(f"{p} FFT") else "experts"]
         for p in prefixes]
    for method in ("ESFT-Token", "ESFT-Gate"):
      relative = lambda key: [combine(lambda e, f: e - f, cells.get(f"{p} {method}", key), cells.get(f"{p} FFT", key))
                              for p in prefixes]
      curves[f"{method}, {family}"] = (x, relative("task_score"), relative("general_loss"))
  return curves


def write_granularity_figure(ablations_root: Path) -> Path | None:
  """The paper's Figure 7 axes for every granularity ablation under `ablations_root` (grouping and from scratch,
  whichever have run) in one figure: ESFT's task score and general loss relative to FFT against the routed
  experts per layer, mean ± std over seeds."""
  runs = [json.loads(p.read_text()) for p in sorted(ablations_root.glob("*/results.json"))]
  runs = [r for r in runs if r["ablation"].startswith("granularity")]
  if not runs:
    return None
  fig = figure(11, 4)
  ax_task, ax_loss = fig.subplots(1, 2)
  experts = set()
  for results in runs:
    for label, (x, task, loss) in granularity_curves(results).items():
      style = ("o-" if "Token" in label else "s--")
      label = f"{label} ({results['config_file']}, seeds {' '.join(map(str, results['seeds']))})"
      _errorbar(ax_task, x, task, 100, style, label=label)
      _errorbar(ax_loss, x, loss, 1, style, label=label)
      experts |= set(x)
  for ax in (ax_task, ax_loss):
    ax.axhline(0, color="gray", linestyle="--", linewidth=1, label="FFT")
    _log2_axis(ax, sorted(experts), "routed experts per layer (equal total parameters; finer to the right)")
  ax_task.set_ylabel("ESFT task score minus FFT's (points)")
  ax_loss.set_ylabel("ESFT general loss minus FFT's")
  ax_task.legend(fontsize="xx-small")
  fig.suptitle("Figure 7's view: ESFT relative to FFT against expert granularity")
  return save_figure(fig, ablations_root / GRANULARITY_PNG)


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
"trained fine experts" counts a trained group as G. Each seed groups its own aligned base.
""",
    "granularity_scratch": """
Every base splits the same routed parameters (experts × width) and active width (top-k × width) differently,
with or without a shared expert of the same width across granularities, and is pretrained like the demo's base
(same text and steps, each with its own tokenizer trained on the same text; each seed pretrains every base anew).
Each is scored on the tasks, ESFT selects at the demo's p (token 0.2, gate 0.1), and FFT runs beside it. "Top-k
gate share" is the share of the task's gate mass on its k busiest experts, mean over layers; with k/E fixed, a
uniform router scores k/E.
""",
}


def _paper_table3(name: str) -> str:
  task, general = PAPER_TABLE3_BASE if name == "base model" else PAPER_TABLE3[name]
  return f"{task} / {general}"


def write_ablation_report(root: Path, results: dict) -> Path:
  """Adds `findings` to `results`, writes results.json, the figure(s) and REPORT.md."""
  name, config = results["ablation"], results["config"]
  cells = Cells(results)
  table, notes, extra = None, [], ""
  if name == "threshold":
    found = _threshold_findings(cells)
    _plot_threshold(cells, root / FIGURE_PNG)
  elif name == "what_to_train":
    found = _what_to_train_findings(cells)
    table = _table(cells, _paper_table3, "the paper: specialised / general")
    _plot_bars(cells, _TITLES[name], root / FIGURE_PNG)
  elif name == "random_experts":
    found = _random_findings(cells)
    _plot_bars(cells, _TITLES[name], root / FIGURE_PNG)
  elif name == "granularity_groups":
    (found, notes), table = _groups_findings(cells), _groups_table(cells)
    _plot_groups(cells, root / FIGURE_PNG)
  else:
    found, table = _scratch_findings(cells), _scratch_table(cells)
    _plot_scratch(cells, root / FIGURE_PNG)
  results["findings"] = found
  atomic_write_text(root / "results.json", json.dumps(results, indent=1))
  if name.startswith("granularity"):
    write_granularity_figure(root.parent)
    extra = (f"\n\nThe paper's Figure 7 view, with every granularity ablation of this workspace (ESFT minus FFT; "
             f"the paper finds the gap widens as experts coarsen): ![](../{GRANULARITY_PNG})")
  seeds = " ".join(map(str, results["seeds"]))
  wall = f"{results['wall_seconds'] / 60:.1f} min"
  if results.get("resumed_runs"):
    wall += f" (this invocation only: {results['resumed_runs']} runs were finished by earlier invocations)"
  source = results["lr_search_from"]
  rates = ", ".join(f"{m} {lr:g}" for m, lr in results["lr"].items())
  chosen_by = f"chosen by the search in `{source}`, reused" if source else "the demo's search chose"
  reuse_flag = f" --lr-search {source}" if source else ""
  text = f"""# Ablation: {_TITLES[name]}

Preset `{results['preset']}` ({results['num_experts']} routed experts, top-{results['top_k']}); tasks
{', '.join(config['tasks'])}; seeds {seeds} (each seed draws its own tasks, alignment data and fine-tuning data
order, with the learning rates {chosen_by}: {rates}).
Generated with `esft-jax ablate configs/ablations/{results['config_file']} --preset {results['preset']} --seed
{seeds}{reuse_flag}` in {wall}. Scores are percentages, mean over the tasks, then mean ± std
over seeds; "general tasks" is the mean multiple-choice accuracy on the demo's general instruction families
(general ability); general loss is on held-out standard-library text.
{_INTROS.get(name, '')}
{table or _table(cells)}

## Findings

A finding holds only when its margin exceeds the spread (the std over seeds of each seed's mean margin; with one
seed the standard error over tasks).

""" + "\n".join(f"- {f['finding']}. **{'held' if f['held'] else 'did not hold'}**: {f['evidence']}." for f in found) \
      + "".join(f"\n- {line}" for line in notes) + f"""

![]({FIGURE_PNG}){extra}
"""
  atomic_write_text(root / "REPORT.md", text)
  return root / "REPORT.md"
