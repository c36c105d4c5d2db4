"""ESFT's sample formatting: token ids and which tokens are targets of the loss.

One conversation becomes

  [BOS] + enc("User: {q1.strip()}\\n\\nAssistant:") + enc(" " + a1.strip()) + [EOS]
        + enc("User: {q2.strip()}\\n\\nAssistant:") + enc(" " + a2.strip()) + [EOS] + ...

each piece encoded on its own without special tokens. Multi-turn follows the official
`utils.get_formatted_input_and_target` (deepseek-ai/ESFT, 809d0e3): BOS only once, before the first turn, and
each later "User: ..." piece follows the previous EOS directly, with no separator, so every turn looks exactly
like a single-turn sample after its EOS. The loss covers the answer tokens and EOS of every turn that is not
masked; BOS and the user pieces are context only. (The official labels also keep BOS; that matters only when
documents are packed without separation, which `packing.pack_esft` handles.)
"""

from __future__ import annotations

import dataclasses

import numpy as np

from esft_jax.data.jsonl import Conversation
from esft_jax.interop.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Example:
  """A formatted sample: `loss_mask_L[i]` says whether token i is predicted in the loss."""
  ids_L: np.ndarray
  loss_mask_L: np.ndarray
  source: str

  def __len__(self) -> int:
    return len(self.ids_L)


def user_piece(question: str) -> str:
  return f"User: {question.strip()}\n\nAssistant:"


def answer_piece(answer: str) -> str:
  return " " + answer.strip()


def special_ids(tokenizer: Tokenizer) -> tuple[int, int]:
  """(BOS, EOS); ESFT's formatting needs both."""
  if tokenizer.bos_id is None or tokenizer.eos_id is None:
    raise ValueError(f"the tokenizer has bos_id={tokenizer.bos_id}, eos_id={tokenizer.eos_id}; ESFT's formatting "
                     "needs both: set bos_token/eos_token in tokenizer_config.json (or *_token_id in config.json)")
  return tokenizer.bos_id, tokenizer.eos_id


def format_conversation(conversation: Conversation, tokenizer: Tokenizer) -> Example:
  bos, eos = special_ids(tokenizer)
  ids, mask = [bos], [False]
  for turn in conversation.turns:
    question = tokenizer.encode(user_piece(turn.user))
    answer = tokenizer.encode(answer_piece(turn.assistant)) + [eos]
    ids += question + answer
    mask += [False] * len(question) + [not turn.masked] * len(answer)
  return Example(np.asarray(ids, np.int32), np.asarray(mask, bool), conversation.source)
