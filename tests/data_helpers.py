"""Small data for the data tests: JSONL writers and a byte-level BPE trained in a fraction of a second."""

from __future__ import annotations

import json
from pathlib import Path

from esft_jax.data.tokenizer_training import train_bpe_tokenizer
from esft_jax.interop.tokenizer import Tokenizer

TEXTS = ["User: what is two plus two?\n\nAssistant:", " four", "User: 请分析下面这句话的意图\n答案：\n\nAssistant:",
         ' {"intent": "Music-Play", "slots": {}}。', "the quick brown fox jumps over the lazy dog"] * 20


def tiny_tokenizer(out_dir: Path) -> Tokenizer:
  return train_bpe_tokenizer(TEXTS, 300, out_dir)


def chat(*pairs: str, mask: tuple[int, ...] = ()) -> dict:
  """{"messages": [...]} from alternating user/assistant strings; `mask` lists masked assistant turns."""
  messages = []
  for i, content in enumerate(pairs):
    message = {"role": "user" if i % 2 == 0 else "assistant", "content": content}
    if i % 2 and i // 2 in mask:
      message["mask"] = 1
    messages.append(message)
  return {"messages": messages}


def write_jsonl(path: Path, records: list[dict | str]) -> Path:
  """Writes one record per line; strings are written as they are (for malformed lines)."""
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records),
                  encoding="utf-8")
  return path
