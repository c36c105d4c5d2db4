"""A training run's folder (`--out`): one run at a time, never replaced or resumed by mistake.

`open_run_folder` runs before anything is loaded or compiled. It refuses a folder that holds a run unless the
run is resumed (`--resume`) or replaced (`--overwrite`), takes an exclusive lock (fcntl) on `OUT/.lock` that
is held until the process ends, so a second `train` on the same folder fails at once, and at a resume compares
the run's recorded settings (run.json) with the new ones, naming every key that differs.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import IO

LOCK_FILE = ".lock"
RUN_JSON = "run.json"
# What `train` writes into its folder, and so what makes a folder hold a run and what --overwrite removes.
RUN_FILES = (RUN_JSON, "checkpoints", "corrupt_checkpoints", "metrics.jsonl", "tensorboard", "adapter")

# Settings a resume may change: how often the run logs, evaluates and saves, how it computes (same values),
# and the number of steps, which extends or shortens a constant schedule. `train.max_segments` follows from the
# data and the packing, which are compared.
RESUMABLE_CHANGES = ("train.eval_every", "train.save_every", "train.log_every", "train.max_checkpoints",
                     "train.remat", "train.attention_impl", "train.expert_impl", "train.max_segments")


def run_files(out_dir: Path) -> list[str]:
  """The names of RUN_FILES present in `out_dir`."""
  return [name for name in RUN_FILES if (out_dir / name).exists()]


def _flat(tree, prefix: str = "") -> dict[str, object]:
  """{"a.b": value} for a nested dict (a list or a scalar is one value)."""
  if not isinstance(tree, dict):
    return {prefix: tree}
  out: dict[str, object] = {}
  for key, value in tree.items():
    out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
  return out


def record_differences(recorded: dict, new: dict) -> list[str]:
  """The settings of two run records that differ, as "key: recorded -> new", except RESUMABLE_CHANGES (and
  the step count where the schedule decays over it). A setting the recorded run's file lacks is not compared:
  the file was written by a version of esft-jax without it."""
  old_flat, new_flat = _flat(recorded), _flat(new)
  free = set(RESUMABLE_CHANGES)
  if new_flat.get("train.schedule") == "constant" and old_flat.get("train.schedule") == "constant":
    free.add("train.steps")
  absent = "(absent)"
  return [f"{key}: {json.dumps(value)} -> {json.dumps(new_flat.get(key, absent))}"
          for key, value in sorted(old_flat.items()) if key not in free and new_flat.get(key, absent) != value]


def _comparable(record: dict) -> dict:
  """The record as JSON reads it back (tuples as lists, keys as strings), so a fresh one compares equal."""
  return json.loads(json.dumps(record))


def check_run_folder(out_dir: Path, record: dict, resume: bool, overwrite: bool) -> None:
  """The refusals that need no lock and write nothing: a run in the way, or a resume with other settings."""
  if resume and overwrite:
    raise ValueError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
  if out_dir.exists() and not out_dir.is_dir():
    raise ValueError(f"--out {out_dir}: exists and is not a folder")
  # A run.json alone is a run that stopped before its first step (one that did not fit its device, say): the next
  # try may change its settings without --overwrite.
  present = run_files(out_dir) if out_dir.is_dir() else []
  if present and present != [RUN_JSON] and not (resume or overwrite):
    raise ValueError(f"--out {out_dir} already holds a run ({', '.join(present)}): pass --resume to continue it, "
                     "--overwrite to replace it, or choose another --out")
  if resume and (out_dir / RUN_JSON).exists():
    try:
      recorded = json.loads((out_dir / RUN_JSON).read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"{out_dir / RUN_JSON}: not valid JSON ({e}); cannot compare the run's settings") from None
    differences = record_differences(recorded, _comparable(record))
    if differences:
      raise ValueError(f"--resume: the settings differ from those the run in {out_dir} was started with "
                       f"({out_dir / RUN_JSON}): " + "; ".join(differences) + ". Resume with the run's "
                       "settings, or start a new run (another --out, or --overwrite)")


def _lock(out_dir: Path) -> IO:
  """An exclusive lock on OUT/.lock, or a ValueError naming the process that holds it."""
  handle = open(out_dir / LOCK_FILE, "a+")
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    handle.seek(0)
    holder = handle.read().strip() or "another process"
    handle.close()
    raise ValueError(f"--out {out_dir}: another esft-jax train ({holder}) is running on this folder; wait for it "
                     "to finish or choose another --out") from None
  handle.seek(0)
  handle.truncate()
  handle.write(f"pid {os.getpid()}\n")
  handle.flush()
  return handle


def open_run_folder(out_dir: Path, record: dict, resume: bool, overwrite: bool) -> IO:
  """Checks the folder (`check_run_folder`), creates it, locks it and, with `overwrite`, removes the earlier
  run's files. Returns the lock's open file: the lock lasts while it is open. Only the first process of a
  multi-host run calls this; the others share its folder."""
  out_dir = Path(out_dir)
  check_run_folder(out_dir, record, resume, overwrite)
  out_dir.mkdir(parents=True, exist_ok=True)
  handle = _lock(out_dir)
  try:
    check_run_folder(out_dir, record, resume, overwrite)  # again under the lock: a run may have started meanwhile
  except ValueError:
    handle.close()
    raise
  if overwrite:
    for name in run_files(out_dir):
      path = out_dir / name
      shutil.rmtree(path) if path.is_dir() else path.unlink()
  return handle
