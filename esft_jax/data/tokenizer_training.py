"""A small byte-level BPE tokenizer for demo models, saved where `interop.tokenizer.load_tokenizer` finds it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

import tokenizers

from esft_jax.data.formatting import answer_piece, user_piece
from esft_jax.data.jsonl import Conversation, Record
from esft_jax.files import atomic_write_text
from esft_jax.interop.tokenizer import Tokenizer, load_tokenizer

BOS, EOS, PAD = "<bos>", "<eos>", "<pad>"
_BYTES = len(tokenizers.pre_tokenizers.ByteLevel.alphabet())


def corpus_texts(records: Iterable[Record]) -> Iterator[str]:
  """The strings a model will see, as ESFT formats them, so merges are learnt on the real pieces."""
  for record in records:
    if isinstance(record, Conversation):
      for turn in record.turns:
        yield user_piece(turn.user)
        yield answer_piece(turn.assistant)
    else:
      yield record.prompt
      yield from (answer_piece(a) for a in record.answers)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> Tokenizer:
  """Trains on `texts` and writes tokenizer.json and tokenizer_config.json (bos/eos/pad tokens) to out_dir.

  Byte-level, so any text encodes and decodes back unchanged; ids 0, 1, 2 are <bos>, <eos>, <pad>.
  """
  if vocab_size < _BYTES + 3:
    raise ValueError(f"vocab_size={vocab_size}: a byte-level BPE needs at least {_BYTES + 3} ids "
                     f"({_BYTES} byte symbols and {BOS} {EOS} {PAD})")
  backend = tokenizers.Tokenizer(tokenizers.models.BPE())
  backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  backend.train_from_iterator(texts, trainer)
  # Like DeepSeek's tokenizer, transformers' encode(add_special_tokens=True) prepends BOS; ours never asks for it.
  backend.post_processor = tokenizers.processors.TemplateProcessing(
      single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, backend.token_to_id(BOS))])
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  atomic_write_text(out_dir / "tokenizer.json", backend.to_str())
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
  atomic_write_text(out_dir / "tokenizer_config.json", json.dumps(config, indent=2))
  return load_tokenizer(out_dir)
