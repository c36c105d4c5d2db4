"""Training a byte-level BPE that `load_tokenizer` reads back with the right BOS/EOS ids."""

import json

import pytest
import tokenizers

from esft_jax.data.jsonl import Conversation, EvalItem, Turn
from esft_jax.data.tokenizer_training import corpus_texts, train_bpe_tokenizer
from esft_jax.interop.tokenizer import load_tokenizer
from tests.data_helpers import TEXTS


def test_round_trip_and_special_ids(tmp_path):
  trained = train_bpe_tokenizer(TEXTS, 320, tmp_path)
  loaded = load_tokenizer(tmp_path)
  assert (loaded.bos_id, loaded.eos_id) == (trained.bos_id, trained.eos_id) == (0, 1)
  assert loaded.backend.token_to_id("<pad>") == 2 and loaded.vocab_size <= 320
  assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
  assert json.loads((tmp_path / "tokenizer_config.json").read_text())["eos_token"] == "<eos>"
  for text in ["User: 请分析\n\nAssistant:", " ünïcode 🙂 never seen", "  two  spaces\n"]:
    ids = loaded.encode(text)
    assert loaded.bos_id not in ids and loaded.decode(ids) == text
  assert len(loaded.encode("the quick brown fox")) < len("the quick brown fox")  # merges were learnt


def test_special_tokens_only_on_request(tmp_path):
  """transformers' encode(add_special_tokens=True) prepends BOS, as DeepSeek's tokenizer does."""
  train_bpe_tokenizer(TEXTS, 300, tmp_path)
  backend = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
  assert backend.encode("four", add_special_tokens=True).ids[0] == 0
  assert 0 not in backend.encode("four", add_special_tokens=False).ids


def test_vocab_too_small(tmp_path):
  with pytest.raises(ValueError, match="vocab_size=100: a byte-level BPE needs at least 259 ids"):
    train_bpe_tokenizer(TEXTS, 100, tmp_path)


def test_corpus_texts_are_the_formatted_pieces():
  records = [Conversation((Turn(" q ", " a "),), "f:1"), EvalItem("User: p\n\nAssistant:", ("x",), ("x",), "f:2")]
  assert list(corpus_texts(records)) == ["User: q\n\nAssistant:", " a", "User: p\n\nAssistant:", " x"]
