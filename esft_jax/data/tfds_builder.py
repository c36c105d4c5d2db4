"""Our JSONL files as TFDS datasets in ArrayRecord files, built and read without TensorFlow.

TFDS writes ArrayRecord through `array_record` and its own example serializer, so a GeneratorBasedBuilder of our
own works with no TensorFlow installed. The builder is not registered (its name is chosen per dataset);
`tfds.data_source` reads a prepared dataset back from the files it wrote (dataset_info.json, features.json).
Records keep file order (shuffling disabled), so packing a TFDS dataset gives the same rows as packing its JSONL.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tensorflow_datasets as tfds

from esft_jax.data.jsonl import Conversation, EvalItem, Record, Turn, read_jsonl
from esft_jax.data.sources import TFDS_PREFIX

VERSION = "1.0.0"
_NAME = re.compile(r"[a-z][a-z0-9_]*")

CONVERSATION_FEATURES = {
    "source": tfds.features.Text(),
    "turns": tfds.features.Sequence({"user": tfds.features.Text(), "assistant": tfds.features.Text(),
                                     "masked": np.bool_}),
}
EVAL_FEATURES = {
    "source": tfds.features.Text(),
    "prompt": tfds.features.Text(),
    "answers": tfds.features.Sequence(tfds.features.Text()),
    "raw_answers": tfds.features.Sequence(tfds.features.Text()),
}


def _encode(record: Record) -> dict[str, Any]:
  if isinstance(record, Conversation):
    turns = [{"user": t.user, "assistant": t.assistant, "masked": t.masked} for t in record.turns]
    return {"source": record.source, "turns": turns}
  return {"source": record.source, "prompt": record.prompt, "answers": list(record.answers),
          "raw_answers": list(record.raw_answers)}


def _text(value: bytes | str) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else value


def decode_record(example: dict[str, Any]) -> Record:
  """A record as `tfds.data_source` returns it (text as bytes, sequences as lists) -> our record type."""
  source = _text(example["source"])
  if "turns" in example:
    t = example["turns"]
    turns = tuple(Turn(_text(u), _text(a), bool(m)) for u, a, m in zip(t["user"], t["assistant"], t["masked"]))
    return Conversation(turns, source)
  return EvalItem(_text(example["prompt"]), tuple(map(_text, example["answers"])),
                  tuple(map(_text, example["raw_answers"])), source)


class JsonlBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """One split from one JSONL file; features follow the file's format (conversations or evaluation items)."""

  VERSION = tfds.core.Version(VERSION)

  def __init__(self, *, name: str, records: list[Record], split: str, config: str | None,
               data_dir: str | Path):
    self.name = name
    self._records = records
    self._split = split
    builder_config = None
    if config:
      builder_config = tfds.core.BuilderConfig(name=config, version=VERSION)
      self.BUILDER_CONFIGS = [builder_config]
    super().__init__(data_dir=str(data_dir), config=builder_config, file_format="array_record")

  def _info(self) -> tfds.core.DatasetInfo:
    if isinstance(self._records[0], Conversation):
      features, description = CONVERSATION_FEATURES, "ESFT training conversations"
    else:
      features, description = EVAL_FEATURES, "ESFT evaluation items"
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features),
                                 disable_shuffling=True, description=description)

  def _split_generators(self, dl_manager):
    return {self._split: self._generate_examples()}

  def _generate_examples(self):
    for key, record in enumerate(self._records):
      yield key, _encode(record)


def _check_name(what: str, value: str, context: str) -> None:
  if not _NAME.fullmatch(value):
    raise ValueError(f"{context}: {what} {value!r} must be snake_case (a-z, 0-9, _; starting with a letter), "
                     "as TFDS names are")


def prepare_tfds(jsonl: str | Path, name: str, data_dir: str | Path, *, config: str | None = None,
                 split: str = "train", overwrite: bool = False) -> Path:
  """Builds `name[/config]` with one `split` from a JSONL file into data_dir; returns the dataset's folder.

  TFDS writes into a temporary folder and renames it when complete, so a failed build leaves nothing behind.
  An existing build is an error unless `overwrite`, which deletes it first.
  """
  _check_name("name", name, str(jsonl))
  if config is not None:
    _check_name("config", config, str(jsonl))
  records = read_jsonl(jsonl)
  builder = JsonlBuilder(name=name, records=records, split=split, config=config, data_dir=data_dir)
  folder = Path(builder.data_dir)
  if builder.is_prepared():
    if not overwrite:
      raise FileExistsError(f"{folder}: the TFDS dataset {name} is already built; delete it or pass overwrite")
    shutil.rmtree(folder)
    builder = JsonlBuilder(name=name, records=records, split=split, config=config, data_dir=data_dir)
  tfds.display_progress_bar(sys.stderr.isatty())  # TFDS's bars would write their cursor codes into logs
  builder.download_and_prepare()
  return folder


def parse_spec(spec: str) -> tuple[str, str]:
  """"tfds:NAME[/CONFIG]:SPLIT" -> (NAME[/CONFIG], SPLIT); SPLIT may carry a TFDS slice ("train[:90%]")."""
  name, sep, split = spec[len(TFDS_PREFIX):].partition(":")
  if not spec.startswith(TFDS_PREFIX) or not sep or not name or not split:
    raise ValueError(f"{spec!r}: expected tfds:NAME[/CONFIG]:SPLIT, e.g. tfds:intent/chat:train")
  for i, part in enumerate(name.split("/")):
    _check_name("config" if i else "name", part, spec)
  return name, split


def open_source(spec: str, data_dir: str | Path | None = None) -> Sequence[dict[str, Any]]:
  """The random-access TFDS data source (len, [i]) for "tfds:NAME[/CONFIG]:SPLIT"; records as TFDS decodes
  them (see `decode_record`). data_dir None means TFDS's default folder."""
  name, split = parse_spec(spec)
  try:
    return tfds.data_source(name, split=split, data_dir=None if data_dir is None else str(data_dir))
  except tfds.core.registered.DatasetNotFoundError:
    raise FileNotFoundError(f"{spec}: no TFDS dataset {name} in {data_dir or 'the default TFDS folder'}; "
                            "build it with prepare_tfds or pass the folder it was built in as data_dir") from None
  except ValueError as e:  # an unknown split or a malformed slice
    raise ValueError(f"{spec}: {e}") from None
