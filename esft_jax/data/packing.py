"""Formatted examples -> fixed-length rows for the model, three ways.

- "esft": the official packing (`get_examples_from_buffer_pad`): greedy in file order, the sample that overflows
  is cut to fill the row and its rest dropped, documents see each other (one segment per row).
- "documents": whole documents, first-fit, each with its own segment id and positions from 0, so packed
  documents never attend to each other.
- "unpacked": one sample per row, as ESFT's scorer runs them.

Every row becomes model inputs and next-token targets: targets[i] = inputs[i + 1], with loss only where that
token is a target of the loss and lies in the same segment. Padding is token 0 in segment 0: the model never
attends to it and it carries no loss.
"""

from __future__ import annotations

import dataclasses
import random
from typing import NamedTuple, Sequence

import numpy as np

from esft_jax.data.formatting import Example

PACKINGS = ("esft", "documents", "unpacked")


@dataclasses.dataclass(frozen=True)
class PackedRows:
  """N rows of length L; item i is row i as a dict, which grain batches into [B, L] arrays."""
  inputs_NxL: np.ndarray  # int32
  targets_NxL: np.ndarray  # int32, inputs shifted left by one
  loss_mask_NxL: np.ndarray  # float32, aligned with targets
  segment_ids_NxL: np.ndarray  # int32, 0 = padding
  positions_NxL: np.ndarray  # int32

  def __len__(self) -> int:
    return len(self.inputs_NxL)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return {"inputs": self.inputs_NxL[i], "targets": self.targets_NxL[i], "loss_mask": self.loss_mask_NxL[i],
            "segment_ids": self.segment_ids_NxL[i], "positions": self.positions_NxL[i]}

  def _arrays(self) -> list[np.ndarray]:
    return [getattr(self, field.name) for field in dataclasses.fields(self)]  # astuple would deep-copy them

  def take(self, indices: np.ndarray) -> PackedRows:
    return PackedRows(*(a[indices] for a in self._arrays()))

  def padded_to(self, n: int) -> PackedRows:
    """The same rows followed by empty ones (all padding, no loss) up to n rows."""
    extra = n - len(self)
    return PackedRows(*(np.concatenate([a, np.zeros((extra, a.shape[1]), a.dtype)]) for a in self._arrays()))


class _Piece(NamedTuple):
  """A run of one example's tokens placed in a row."""
  row: int
  offset: int
  ids: np.ndarray
  is_target: np.ndarray
  segment: int
  first_position: int


def _assemble(pieces: list[_Piece], seq_length: int) -> PackedRows:
  n_rows = max(p.row for p in pieces) + 1
  tokens = np.zeros((n_rows, seq_length), np.int32)
  is_target = np.zeros((n_rows, seq_length), bool)
  segment_ids = np.zeros((n_rows, seq_length), np.int32)
  positions = np.zeros((n_rows, seq_length), np.int32)
  for p in pieces:
    span = slice(p.offset, p.offset + len(p.ids))
    tokens[p.row, span] = p.ids
    is_target[p.row, span] = p.is_target
    segment_ids[p.row, span] = p.segment
    positions[p.row, span] = np.arange(p.first_position, p.first_position + len(p.ids))
  targets = np.zeros_like(tokens)
  targets[:, :-1] = tokens[:, 1:]
  same_segment = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)
  loss_mask = np.zeros(tokens.shape, np.float32)
  loss_mask[:, :-1] = is_target[:, 1:] & same_segment
  return PackedRows(tokens, targets, loss_mask, segment_ids, positions)


def _check(examples: Sequence[Example], seq_length: int) -> None:
  if not examples:
    raise ValueError("no examples to pack")
  if seq_length < 2:
    raise ValueError(f"seq_length={seq_length}: a row needs at least 2 tokens to predict one")


def pack_esft(examples: Sequence[Example], seq_length: int, *, random_concat_ratio: float = 0.2,
              seed: int = 5934875, predict_bos: bool = True) -> PackedRows:
  """ESFT's packing, step for step, so that the official tokenizer and seed give the official rows.

  Greedy in order: a sample longer than the room left keeps its last `room` tokens and the rest is dropped;
  then, for a sample that follows another in its row, `random.Random(seed)` drops its first token with
  probability `random_concat_ratio` (one draw per such sample, after the cut, as the official code does). The
  last row is right-padded (the official code also appends an all-padding row when the data end exactly on a
  row boundary; that row has no targets and is left out here). Documents share one segment and positions run
  0..L-1 across them. With `predict_bos`, a document's BOS is a target after the previous document's EOS, as in
  the official labels.
  """
  _check(examples, seq_length)
  if not 0.0 <= random_concat_ratio <= 1.0:
    raise ValueError(f"random_concat_ratio={random_concat_ratio} must lie in [0, 1]")
  rng = random.Random(seed)
  pieces: list[_Piece] = []
  row, filled = 0, 0
  for example in examples:
    ids, is_target = example.ids_L, example.loss_mask_L.copy()
    is_target[0] |= predict_bos
    room = seq_length - filled
    if len(ids) > room:
      ids, is_target = ids[-room:], is_target[-room:]
    if filled and rng.random() < random_concat_ratio:
      ids, is_target = ids[1:], is_target[1:]
    pieces.append(_Piece(row, filled, ids, is_target, 1, filled))
    filled += len(ids)
    if filled == seq_length:
      row, filled = row + 1, 0
  return _assemble([p for p in pieces if len(p.ids)], seq_length)


def _fit(example: Example, seq_length: int, truncate: bool) -> Example:
  if len(example) <= seq_length:
    return example
  if not truncate:
    raise ValueError(f"{example.source}: the formatted sample has {len(example)} tokens, more than "
                     f"seq_length={seq_length}; raise seq_length, shorten or drop the sample, or enable truncation "
                     "(which keeps its last seq_length tokens, as ESFT's packing does)")
  return Example(example.ids_L[-seq_length:], example.loss_mask_L[-seq_length:], example.source)


class _FirstFit:
  """The lowest-index row with room for a document, in O(log rows): a max-tree over each row's free tokens.
  Leaves past the last opened row are empty rows, so a document that fits nowhere opens the next row."""

  def __init__(self, max_rows: int, seq_length: int):
    self.leaves = 1 << max(max_rows - 1, 0).bit_length()
    self.free = [seq_length] * (2 * self.leaves)
    self.seq_length = seq_length

  def place(self, length: int) -> tuple[int, int]:
    """(row, offset) for a document of `length` tokens."""
    node = 1
    while node < self.leaves:
      node = 2 * node if self.free[2 * node] >= length else 2 * node + 1
    offset = self.seq_length - self.free[node]
    self.free[node] -= length
    parent = node // 2
    while parent:
      self.free[parent] = max(self.free[2 * parent], self.free[2 * parent + 1])
      parent //= 2
    return node - self.leaves, offset


def pack_documents(examples: Sequence[Example], seq_length: int, *, truncate: bool = False) -> PackedRows:
  """Whole documents, first-fit in order; segment ids 1, 2, ... within a row and positions from 0 per
  document. A document longer than `seq_length` is an error unless `truncate`."""
  _check(examples, seq_length)
  first_fit = _FirstFit(len(examples), seq_length)
  segments_in_row: dict[int, int] = {}
  pieces = []
  for example in examples:
    example = _fit(example, seq_length, truncate)
    row, offset = first_fit.place(len(example))
    segments_in_row[row] = segments_in_row.get(row, 0) + 1
    pieces.append(_Piece(row, offset, example.ids_L, example.loss_mask_L, segments_in_row[row], 0))
  return _assemble(pieces, seq_length)


def pad_unpacked(examples: Sequence[Example], seq_length: int, *, truncate: bool = False) -> PackedRows:
  """One sample per row, right-padded: how ESFT's scorer sees the data."""
  _check(examples, seq_length)
  pieces = []
  for i, example in enumerate(examples):
    example = _fit(example, seq_length, truncate)
    pieces.append(_Piece(i, 0, example.ids_L, example.loss_mask_L, 1, 0))
  return _assemble(pieces, seq_length)


def pack_examples(examples: Sequence[Example], packing: str, seq_length: int, *, random_concat_ratio: float = 0.2,
                  seed: int = 5934875, truncate: bool = False) -> PackedRows:
  """One entry point for the `packing` option: "esft" (always cuts), "documents" or "unpacked"."""
  if packing == "esft":
    return pack_esft(examples, seq_length, random_concat_ratio=random_concat_ratio, seed=seed)
  if packing == "documents":
    return pack_documents(examples, seq_length, truncate=truncate)
  if packing == "unpacked":
    return pad_unpacked(examples, seq_length, truncate=truncate)
  raise ValueError(f"packing={packing!r}; choose one of {', '.join(PACKINGS)}")
