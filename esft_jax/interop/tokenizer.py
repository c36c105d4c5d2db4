"""A model directory's tokenizer (`tokenizer.json` through `tokenizers`), with BOS/EOS ids from its configs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import tokenizers


@dataclasses.dataclass
class Tokenizer:
  backend: tokenizers.Tokenizer
  bos_id: int | None
  eos_id: int | None

  def encode(self, text: str) -> list[int]:
    """Token ids without special tokens (ESFT encodes each piece this way and adds BOS/EOS itself)."""
    return self.backend.encode(text, add_special_tokens=False).ids

  def decode(self, ids: list[int]) -> str:
    return self.backend.decode(ids, skip_special_tokens=True)

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)


def _token_content(value) -> str | None:
  return value.get("content") if isinstance(value, dict) else value


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
  model_dir = Path(model_dir)
  file = model_dir / "tokenizer.json"
  if not file.exists():
    raise FileNotFoundError(f"{file}: no tokenizer.json; esft-jax reads fast (tokenizers) tokenizers only")
  try:
    backend = tokenizers.Tokenizer.from_file(str(file))
  except Exception as e:  # tokenizers raises a bare Exception on malformed files
    raise ValueError(f"{file}: cannot be read by `tokenizers` ({e})") from None
  ids: dict[str, int | None] = {"bos": None, "eos": None}
  tok_config = model_dir / "tokenizer_config.json"
  if tok_config.exists():
    settings = json.loads(tok_config.read_text())
    for which in ids:
      token = _token_content(settings.get(f"{which}_token"))
      if token is not None:
        ids[which] = backend.token_to_id(token)
  model_config = model_dir / "config.json"
  if model_config.exists():
    settings = json.loads(model_config.read_text())
    for which in ids:
      value = settings.get(f"{which}_token_id")
      if ids[which] is None and value is not None:
        ids[which] = value[0] if isinstance(value, list) else value
  return Tokenizer(backend, ids["bos"], ids["eos"])
