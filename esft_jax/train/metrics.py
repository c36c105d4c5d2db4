"""Training metrics to three places: the terminal (a tqdm bar), TensorBoard event files, and metrics.jsonl."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import tqdm


def progress(total: int, initial: int = 0, desc: str = "") -> tqdm.tqdm:
  return tqdm.tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, disable=not sys.stderr.isatty())


class MetricsWriter:
  """Appends one JSON object per logged step to `out_dir/metrics.jsonl` and mirrors the scalars to
  TensorBoard under `out_dir/tensorboard` (`tensorboard --logdir out_dir/tensorboard`)."""

  def __init__(self, out_dir: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    from tensorboardX import SummaryWriter  # here, so scoring, decoding and the benchmarks run without it

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
