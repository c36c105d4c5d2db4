"""ESFT's JSONL files: training conversations (`messages`) and evaluation items (`prompt`, `answers`).

Records are validated here, once, so that every later error (formatting, packing) can name the line it came
from through `source` ("path:line").
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class Turn:
  """One user question and its assistant answer; `masked` answers are context only (ESFT's `"mask": 1`)."""
  user: str
  assistant: str
  masked: bool = False


@dataclasses.dataclass(frozen=True)
class Conversation:
  turns: tuple[Turn, ...]
  source: str


@dataclasses.dataclass(frozen=True)
class EvalItem:
  """A prompt that is already formatted ("User: ...\\n\\nAssistant:") and its reference answers; `extra` keeps
  the record's other fields (e.g. a code task's `tests`) for the metric."""
  prompt: str
  answers: tuple[str, ...]
  raw_answers: tuple[str, ...]
  source: str
  extra: dict = dataclasses.field(default_factory=dict, compare=False)

  def metric_item(self) -> dict:
    """The dict the metrics in esft_jax.evaluate.metrics read."""
    answers = {k: list(v) for k, v in (("answers", self.answers), ("raw_answers", self.raw_answers)) if v}
    return {**self.extra, **answers}


Record = Conversation | EvalItem


def parse_conversation(obj: Any, source: str) -> Conversation:
  """Checks ESFT's training format: user and assistant messages alternating, user first, assistant last."""
  if not isinstance(obj, dict) or "messages" not in obj:
    raise ValueError(f"{source}: no 'messages' key; training records look like "
                     '{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}')
  messages = obj["messages"]
  if not isinstance(messages, list) or not messages:
    raise ValueError(f"{source}: 'messages' must be a non-empty list, got {messages!r:.80}")
  turns = []
  for i, message in enumerate(messages):
    expected = "user" if i % 2 == 0 else "assistant"
    role = message.get("role") if isinstance(message, dict) else None
    if role != expected:
      raise ValueError(f"{source}: message {i} has role {role!r}, expected {expected!r} "
                       "(roles must alternate user/assistant, starting with user)")
    content = message.get("content")
    if not isinstance(content, str):
      raise ValueError(f"{source}: message {i} content must be a string, got {content!r:.80}")
    mask = message.get("mask", 0)
    if mask not in (0, 1) or (mask == 1 and role == "user"):
      raise ValueError(f"{source}: message {i} has mask {mask!r}; only assistant messages take a mask, 0 or 1")
    if role == "assistant":
      turns.append(Turn(messages[i - 1]["content"], content, masked=mask == 1))
  if len(messages) % 2:
    raise ValueError(f"{source}: the last message is a user message with no assistant answer")
  return Conversation(tuple(turns), source)


def parse_eval_item(obj: Any, source: str) -> EvalItem:
  if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
    raise ValueError(f"{source}: no string 'prompt'; evaluation records look like "
                     '{"prompt": "User: ...\\n\\nAssistant:", "answers": [...], "raw_answers": [...]}')
  lists = {}
  for key in ("answers", "raw_answers"):
    value = obj.get(key, [])
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
      raise ValueError(f"{source}: '{key}' must be a list of strings, got {value!r:.80}")
    lists[key] = tuple(value)
  extra = {k: v for k, v in obj.items() if k not in ("prompt", "answers", "raw_answers")}
  return EvalItem(obj["prompt"], lists["answers"], lists["raw_answers"], source, extra)


def read_jsonl(path: str | Path) -> list[Record]:
  """All records of a file, in file order; the first record decides the format (`messages` -> training,
  `prompt` -> evaluation) and every other line must match it. Blank lines are skipped."""
  path = Path(path)
  records: list[Record] = []
  parse = None
  with path.open("rb") as f:  # bytes, so that a decoding error can name its line
    for number, raw in enumerate(f, start=1):
      source = f"{path}:{number}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{source}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); save the file "
                         "as UTF-8") from None
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{source}: not valid JSON ({e.msg} at column {e.colno})") from None
      if parse is None:
        parse = parse_eval_item if isinstance(obj, dict) and "prompt" in obj else parse_conversation
      records.append(parse(obj, source))
  if not records:
    raise ValueError(f"{path}: the file has no records (one JSON object per line expected)")
  return records
