"""The benchmark scripts stay runnable: their --tiny runs on CPU print their tables, and what the tables
compare agrees (the same first loss on every JAX expert path, the same greedy tokens as transformers). Timings
are never asserted."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_tiny(script: str) -> list[dict[str, str]]:
  """The rows of the markdown table that `script --tiny` prints, as {column: cell}."""
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  proc = subprocess.run([sys.executable, str(REPO / "experiments" / script), "--tiny"], capture_output=True,
                        text=True, timeout=600, env=env, check=True)
  lines = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[1:]]


def test_bench_train_tiny_runs_every_path_and_torch():
  rows = {row["path"]: row for row in run_tiny("bench_train.py")}
  assert list(rows) == ["torch", "grouped", "auto"]
  for row in rows.values():
    assert float(row["tokens/s"].replace(",", "")) > 0, row
  assert rows["grouped"]["first loss"] == rows["auto"]["first loss"]  # same weights and batch on both paths
  # torch has its own random weights, but the same loss on the same batch is near ln(vocab) for both.
  assert abs(float(rows["torch"]["first loss"]) - float(rows["auto"]["first loss"])) < 0.5
