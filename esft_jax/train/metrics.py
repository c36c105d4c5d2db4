"""Training metrics to three places: the terminal (a tqdm bar), TensorBoard event files, and metrics.jsonl."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import tqdm

from esft_jax.files import atomic_write_text


def keep_lines_through(path: Path, step: int) -> None:
  """Rewrites metrics.jsonl (atomically) without the lines past `step`, and without a line cut short by a
  killed run, which cannot be parsed."""
  if not path.exists():
    return
  kept = []
  for line in path.read_text().splitlines():
    try:
      if json.loads(line)["step"] <= step:
        kept.append(line + "\n")
    except (json.JSONDecodeError, KeyError, TypeError):
      continue
  atomic_write_text(path, "".join(kept))


def validation_losses(path: Path) -> list[tuple[int, float]]:
  """(step, validation loss) at every evaluation a run's metrics.jsonl (`path`) records."""
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such metrics file; the run that should have written it did not finish "
                            f"or was moved; delete its folder ({path.parent}) to run it again")
  records = [json.loads(line) for line in path.read_text().splitlines()]
  return [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]


def progress(total: int, initial: int = 0, desc: str = "") -> tqdm.tqdm:
  return tqdm.tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, disable=not sys.stderr.isatty())


class MetricsWriter:
  """Appends one JSON object per logged step to `out_dir/metrics.jsonl` and mirrors the scalars to
  TensorBoard under `out_dir/tensorboard` (`tensorboard --logdir out_dir/tensorboard`). A run that starts at
  `first_step` (a resumed one) first drops the lines of later steps, which it is about to log again."""

  def __init__(self, out_dir: Path, first_step: int = 0):
    out_dir.mkdir(parents=True, exist_ok=True)
    from tensorboardX import SummaryWriter  # here, so scoring, decoding and the benchmarks run without it

    keep_lines_through(out_dir / "metrics.jsonl", first_step)
    self._jsonl = open(out_dir / "metrics.jsonl", "a")
    self._tb = SummaryWriter(str(out_dir / "tensorboard"))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
    self._jsonl.flush()
    for key, value in values.items():
      self._tb.add_scalar(key, value, step)

  def text(self, tag: str, value: str) -> None:
    self._tb.add_text(tag, value)

  def close(self) -> None:
    self._jsonl.close()
    self._tb.close()
