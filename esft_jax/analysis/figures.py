"""The paper's routing figures as PNG files: Figure 2 (gate mass by expert rank), Figure 3 (top-K overlap
between tasks) and Figure 4 (selected experts per layer).

Figures are drawn on matplotlib `Figure` objects with the Agg canvas, never through pyplot, so no display or
GUI backend is touched. Each PNG is written under a temporary name and renamed into place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from esft_jax.files import atomic_open

CONCENTRATION_PNG = "figure2_concentration.png"
OVERLAP_PNG = "figure3_overlap.png"
SELECTED_EXPERTS_PNG = "figure4_selected_experts.png"
METHOD_STYLES = {"token": "-", "gate": "--"}


def plot_concentration(concentration: Mapping[str, list[float]], path: str | Path,
                       spread: Mapping[str, list[float]] | None = None) -> Path:
  """Figure 2: per task, the mean over layers of the r-th largest gate share against rank r (log scale), a
  band of ± one standard deviation over layers where `spread` is given, and the uniform share 1/E."""
  num_experts = {len(v) for v in concentration.values()}
  if len(num_experts) != 1:
    raise ValueError(f"the tasks' concentration lists have different lengths {sorted(num_experts)}; "
                     "score every task with the same model")
  e = num_experts.pop()
  fig = figure(6.4, 4.2)
  ax = fig.add_subplot()
  ranks = np.arange(1, e + 1)
  for task, mean in concentration.items():
    (line,) = ax.plot(ranks, mean, label=task, linewidth=1.6)
    if spread is not None and task in spread:
      mean_E, std_E = np.asarray(mean), np.asarray(spread[task])
      ax.fill_between(ranks, np.maximum(mean_E - std_E, 0), mean_E + std_E, color=line.get_color(), alpha=0.15,
                      linewidth=0)
  ax.axhline(1 / e, color="black", linestyle=":", linewidth=1.2, label=f"uniform (1/{e})")
  ax.set_xscale("log", base=2)
  ticks = [2**i for i in range(int(np.log2(e)) + 1)]
  ax.set_xticks(ticks, [str(t) for t in ticks])
  ax.set_xlim(1, e)
  ax.set_ylim(bottom=0)
  ax.set_xlabel("expert rank (by summed gate weight)")
  ax.set_ylabel("share of the layer's gate mass")
  ax.set_title("Figure 2: top expert distribution (mean ± std over layers)")
  ax.grid(True, which="major", alpha=0.3)
  ax.legend(fontsize="small")
  return save_figure(fig, path)


def plot_overlap(overlap: Mapping[str, Mapping[str, float]], top_k: int, path: str | Path) -> Path:
  """Figure 3: heatmap of the mean number of shared top-K experts, first task's even samples (rows) against the
  second task's odd samples (columns), each cell annotated."""
  tasks = list(overlap)
  values_TxT = np.array([[overlap[a][b] for b in tasks] for a in tasks], np.float64)
  fig = figure(3.4 + 0.8 * len(tasks), 2.6 + 0.8 * len(tasks))
  ax = fig.add_subplot()
  image = ax.imshow(values_TxT, cmap="Blues", vmin=0, vmax=top_k)
  for i in range(len(tasks)):
    for j in range(len(tasks)):
      value = values_TxT[i, j]
      ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize="small",
              color="white" if value > 0.6 * top_k else "black")
  ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
  ax.set_yticks(range(len(tasks)), tasks)
  ax.set_xlabel("second sample (odd lines)")
  ax.set_ylabel("first sample (even lines)")
  ax.set_title(f"Figure 3: shared top-{top_k} experts\n(mean over layers)", fontsize="medium")
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
  return save_figure(fig, path)


def plot_selected_experts(configs: Mapping[tuple[str, str], Mapping[str, Any]], path: str | Path) -> Path:
  """Figure 4: selected experts per MoE layer, one line per (task, method): colour by task, dashes by method
  (token solid, gate dashed). `configs` maps (task, method) to an expert config (`{"experts": {layer: ids}}`)."""
  if not configs:
    raise ValueError("no expert configs given; pass {(task, method): expert config}")
  fig = figure(7.2, 4.2)
  ax = fig.add_subplot()
  colours: dict[str, str] = {}
  layers: set[int] = set()
  for (task, method), config in configs.items():
    try:
      per_layer = {int(layer): len(ids) for layer, ids in config["experts"].items()}
    except (KeyError, TypeError, ValueError, AttributeError):
      raise ValueError(f"expert config of ({task}, {method}) needs 'experts': {{layer: [expert ids]}}") from None
    x = sorted(per_layer)
    layers.update(x)
    colour = colours.setdefault(task, f"C{len(colours) % 10}")
    mean = np.mean([per_layer[layer] for layer in x])
    ax.plot(x, [per_layer[layer] for layer in x], color=colour, linestyle=METHOD_STYLES.get(method, ":"),
            marker="o", markersize=3, linewidth=1.4, label=f"{task} / {method} (mean {mean:.1f})")
  ax.set_xlabel("MoE layer")
  ax.set_ylabel("selected experts")
  ax.set_ylim(bottom=0)
  ax.yaxis.set_major_locator(MaxNLocator(integer=True))
  if len(layers) <= 32:
    ax.set_xticks(sorted(layers))
  ax.tick_params(axis="x", labelsize="small")
  ax.set_title("Figure 4: experts selected per layer, per task and method")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize="x-small", ncol=2 if len(configs) > 6 else 1)
  return save_figure(fig, path)


def plot_routing_figures(figures: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
  """Figures 2 and 3 from `routing.routing_figures`' dict (or its routing_figures.json) into `out_dir`."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  return [plot_concentration(figures["concentration"], out_dir / CONCENTRATION_PNG,
                             figures.get("concentration_spread")),
          plot_overlap(figures["overlap"], figures["top_k"], out_dir / OVERLAP_PNG)]


def figure(width: float, height: float) -> Figure:
  fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
  path = Path(path)
  with atomic_open(path, "wb") as f:  # under files.temp_path(path), then os.replace
    fig.savefig(f, format="png")
  return path
