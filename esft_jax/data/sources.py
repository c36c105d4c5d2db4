"""The one way every command reads its data option: a JSONL path or "tfds:NAME[/CONFIG]:SPLIT"."""

from __future__ import annotations

from pathlib import Path

import grain

from esft_jax.data.jsonl import read_jsonl

TFDS_PREFIX = "tfds:"


def open_examples(spec: str | Path, data_dir: str | Path | None = None) -> grain.MapDataset:
  """Records (`Conversation` or `EvalItem`) with random access and a length, in file order. A JSONL file is read
  and checked whole; a TFDS dataset (built by `prepare_tfds`, found in data_dir) is read lazily."""
  if str(spec).startswith(TFDS_PREFIX):
    # Imported here: tensorflow-datasets is slow to import and absent where only JSONL is read (the GPU image).
    from esft_jax.data.tfds_builder import decode_record, open_source

    return grain.MapDataset.source(open_source(str(spec), data_dir)).map(decode_record)
  return grain.MapDataset.source(read_jsonl(spec))
