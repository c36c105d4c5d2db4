"""Atomic file writes (write under `<name>.tmp` next to the target, then `os.replace` it into place), and JSON
files read with errors that name the file.

A reader never sees a half-written file: it finds the old file or the new one. On an error the temporary
file is removed and the target is left as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import IO, Iterator


def temp_path(path: str | Path) -> Path:
  """The temporary name a file is written under before it is renamed to `path`."""
  path = Path(path)
  return path.with_name(path.name + ".tmp")


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
  """Opens `path`'s temporary file for writing ("w" text or "wb" binary) and renames it to `path` on success."""
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic_open: mode must be 'w' or 'wb', not {mode!r}")
  path = Path(path)
  tmp = temp_path(path)
  try:
    with open(tmp, mode, encoding=None if mode == "wb" else encoding) as f:
      yield f
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
  """Writes `text` to `path` atomically."""
  with atomic_open(path, "w", encoding) as f:
    f.write(text)


def read_json(path: str | Path, missing_hint: str):
  """The parsed JSON file; a missing file raises FileNotFoundError naming it and `missing_hint` (what to do),
  malformed JSON a ValueError naming it and the parser's position."""
  path = Path(path)
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: not found; {missing_hint}") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None
