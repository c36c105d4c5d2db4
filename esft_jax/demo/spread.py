"""Results over seeds, shared by the demo's report and the ablations': mean ± std per cell, and findings that hold
only beyond the spread.

A finding is a margin per seed and task, positive where its claim holds. It holds only when the mean margin
exceeds the spread: the standard deviation over seeds of each seed's mean margin, or with one seed the standard
error over tasks (with one seed and one task there is no spread, and any positive margin holds)."""

from __future__ import annotations

import numpy as np


def mean_std(values) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for a single value)."""
  values = np.asarray(values, float)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def pm(values, scale: float = 100, digits: int = 1) -> str:
  """'mean ± std' of `values` times `scale`."""
  mean, std = mean_std(np.asarray(values, float) * scale)
  return f"{mean:.{digits}f} ± {std:.{digits}f}"


def verdict(margins: dict[str, list[float]]) -> tuple[float, float, str]:
  """(mean margin, spread, what the spread is) from each seed's per-task margins."""
  per_seed = [float(np.mean(m)) for m in margins.values()]
  if len(per_seed) > 1:
    return float(np.mean(per_seed)), mean_std(per_seed)[1], f"std over {len(per_seed)} seeds"
  values = next(iter(margins.values()))
  spread = float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
  return float(np.mean(values)), spread, f"standard error over {len(values)} tasks, one seed"


def finding(claim: str, margins: dict[str, list[float]], numbers: str, unit: str = "points",
            scale: float = 100) -> dict:
  """{"finding", "held", "evidence", "margin", "spread"}: `claim` holds when its mean margin exceeds the spread;
  `numbers` (what the margin is made of) leads the evidence, margin and spread in `unit` (× `scale`) follow."""
  mean, spread, kind = verdict(margins)
  return {"finding": claim, "held": mean > spread,
          "evidence": f"{numbers}; margin {scale * mean:+.2f} {unit} against a spread of {scale * spread:.2f} "
                      f"({kind})",
          "margin": mean, "spread": spread}
