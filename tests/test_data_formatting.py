"""ESFT's sample formatting: the exact pieces, and the loss on answers and EOS only."""

import dataclasses

import numpy as np
import pytest

from esft_jax.data.formatting import format_conversation
from esft_jax.data.jsonl import Conversation, Turn, read_jsonl
from esft_jax.data.tokenizer_training import corpus_texts, train_bpe_tokenizer
from tests.data_helpers import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def test_single_turn_pieces(tokenizer):
  conversation = Conversation((Turn("  what is two plus two?\n", " four \n\n"),), "f:1")
  example = format_conversation(conversation, tokenizer)
  question = tokenizer.encode("User: what is two plus two?\n\nAssistant:")
  answer = tokenizer.encode(" four")
  assert example.ids_L.tolist() == [tokenizer.bos_id, *question, *answer, tokenizer.eos_id]
  assert example.loss_mask_L.tolist() == [False] * (1 + len(question)) + [True] * (len(answer) + 1)
  assert example.ids_L.dtype == np.int32 and example.source == "f:1"


def test_multi_turn_follows_the_official_layout(tokenizer):
  """BOS once; the second "User:" piece follows the first EOS directly; the masked turn has no loss."""
  turns = (Turn("q1", "a1", masked=True), Turn("q2", "a2"))
  example = format_conversation(Conversation(turns, "f:1"), tokenizer)
  enc = tokenizer.encode
  pieces = [[tokenizer.bos_id], enc("User: q1\n\nAssistant:"), enc(" a1") + [tokenizer.eos_id],
            enc("User: q2\n\nAssistant:"), enc(" a2") + [tokenizer.eos_id]]
  assert example.ids_L.tolist() == sum(pieces, [])
  targets = [False, False, False, False, True]
  assert example.loss_mask_L.tolist() == sum(([t] * len(p) for t, p in zip(targets, pieces)), [])


def test_needs_bos_and_eos(tokenizer):
  with pytest.raises(ValueError, match="bos_id=None"):
    format_conversation(Conversation((Turn("q", "a"),), "f:1"), dataclasses.replace(tokenizer, bos_id=None))


def test_reference_line(esft_reference, tmp_path):
  """The first line of the official intent training file, piece by piece, with a tokenizer trained on it."""
  records = read_jsonl(esft_reference / "datasets" / "intent_train.jsonl")[:200]
  tokenizer = train_bpe_tokenizer(corpus_texts(records), 600, tmp_path)
  example = format_conversation(records[0], tokenizer)
  ids, mask = example.ids_L.tolist(), example.loss_mask_L
  question = "User: 请分析下面这句话的意图，并转化为json格式： 美国片速度与激情播放一下呢\n答案：\n\nAssistant:"
  answer = ' {"intent": "FilmTele-Play", "slots": {"name": "速度与激情", "region": "美国"}}。'
  n_question = len(tokenizer.encode(question))
  assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
  assert tokenizer.decode(ids[1:1 + n_question]) == question
  assert tokenizer.decode(ids[1 + n_question:-1]) == answer
  assert not mask[:1 + n_question].any() and mask[1 + n_question:].all()
