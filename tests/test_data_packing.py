"""Packing: ESFT's cut-and-drop rule step by step, first-fit documents with segments, unpacked rows."""

import random

import numpy as np
import pytest

from esft_jax.data.formatting import Example
from esft_jax.data.packing import PackedRows, pack_documents, pack_esft, pack_examples, pad_unpacked

BOS = 1


def doc(k: int, n: int, n_prompt: int = 2) -> Example:
  """Document k: BOS, then tokens 10k+1 ..., the first n_prompt tokens (with BOS) without loss."""
  ids = np.array([BOS] + [10 * k + i for i in range(1, n)], np.int32)
  return Example(ids, np.arange(n) >= n_prompt, f"f:{k}")


def check_alignment(rows: PackedRows):
  """targets are inputs shifted by one; no loss into padding or across segments."""
  assert (rows.targets_NxL[:, :-1] == rows.inputs_NxL[:, 1:]).all()
  segments = rows.segment_ids_NxL
  crossing = np.zeros(segments.shape, bool)
  crossing[:, :-1] = (segments[:, 1:] != segments[:, :-1]) | (segments[:, 1:] == 0)
  crossing[:, -1] = True
  assert not rows.loss_mask_NxL[crossing].any()
  for name, dtype in [("inputs_NxL", np.int32), ("targets_NxL", np.int32), ("loss_mask_NxL", np.float32),
                      ("segment_ids_NxL", np.int32), ("positions_NxL", np.int32)]:
    assert getattr(rows, name).dtype == dtype


def test_esft_cuts_the_overflowing_sample_and_drops_its_rest():
  rows = pack_esft([doc(1, 5), doc(2, 5), doc(3, 4)], 8, random_concat_ratio=0.0, predict_bos=False)
  assert rows.inputs_NxL.tolist() == [[1, 11, 12, 13, 14, 22, 23, 24],  # doc 2 keeps its last 3 tokens
                                      [1, 31, 32, 33, 0, 0, 0, 0]]  # the last row is padded
  assert rows.segment_ids_NxL.tolist() == [[1] * 8, [1] * 4 + [0] * 4]
  assert rows.positions_NxL.tolist() == [list(range(8)), [0, 1, 2, 3, 0, 0, 0, 0]]
  # targets 12..14 of doc 1, then doc 2's kept tokens 22..24 (past its prompt; as in the official labels, 22
  # is predicted from doc 1's last token, since ESFT's documents see each other)
  assert rows.loss_mask_NxL.tolist() == [[0, 1, 1, 1, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0, 0, 0]]
  check_alignment(rows)


def test_esft_drops_the_first_token_after_the_cut():
  """With ratio 1 every later sample loses its first token: doc 2's cut tail loses one more, doc 3 is cut to
  its last token, which is then dropped too, and the row ends one short, padded."""
  rows = pack_esft([doc(1, 5), doc(2, 5), doc(3, 4)], 8, random_concat_ratio=1.0, predict_bos=False)
  assert rows.inputs_NxL.tolist() == [[1, 11, 12, 13, 14, 23, 24, 0]]


def test_esft_seeded_draws_and_bos_target():
  """One draw of random.Random(seed) per sample that joins a non-empty row, in order; BOS is then a target."""
  examples = [doc(k, 3, n_prompt=1) for k in range(1, 30)]
  rows = pack_esft(examples, 1000, random_concat_ratio=0.5, seed=7)
  rng = random.Random(7)
  expected = list(examples[0].ids_L)
  for example in examples[1:]:
    expected += list(example.ids_L[1:] if rng.random() < 0.5 else example.ids_L)
  assert rows.inputs_NxL[0, :len(expected)].tolist() == expected
  bos_after_eos = np.flatnonzero(rows.inputs_NxL[0, 1:] == BOS)
  assert len(bos_after_eos) and rows.loss_mask_NxL[0, bos_after_eos].all()
  assert pack_esft(examples, 1000, random_concat_ratio=0.5, seed=7).inputs_NxL.tolist() == rows.inputs_NxL.tolist()


def test_esft_exact_fill_adds_no_empty_row():
  rows = pack_esft([doc(1, 4), doc(2, 4)], 8, random_concat_ratio=0.0)
  assert len(rows) == 1 and (rows.segment_ids_NxL == 1).all()


def naive_first_fit(lengths, seq_length):
  free, placement = [], []
  for n in lengths:
    row = next((r for r, f in enumerate(free) if f >= n), len(free))
    if row == len(free):
      free.append(seq_length)
    placement.append((row, seq_length - free[row]))
    free[row] -= n
  return placement


def test_documents_first_fit_matches_the_obvious_loop():
  lengths = np.random.default_rng(0).integers(2, 40, size=300)
  examples = [doc(k, int(n)) for k, n in enumerate(lengths)]
  rows = pack_documents(examples, 64)
  placement = naive_first_fit(lengths, 64)
  assert len(rows) == max(r for r, _ in placement) + 1
  segment_count = {}
  for example, (row, offset) in zip(examples, placement):
    segment_count[row] = segment_count.get(row, 0) + 1
    span = slice(offset, offset + len(example))
    assert rows.inputs_NxL[row, span].tolist() == example.ids_L.tolist()
    assert (rows.segment_ids_NxL[row, span] == segment_count[row]).all()
    assert rows.positions_NxL[row, span].tolist() == list(range(len(example)))
  check_alignment(rows)
  assert rows.loss_mask_NxL.sum() == sum(e.loss_mask_L.sum() for e in examples)  # no target lost


def test_unpacked_rows():
  rows = pad_unpacked([doc(1, 3), doc(2, 5)], 6)
  assert rows.inputs_NxL.tolist() == [[1, 11, 12, 0, 0, 0], [1, 21, 22, 23, 24, 0]]
  assert rows.segment_ids_NxL.tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]]
  assert rows.loss_mask_NxL.tolist() == [[0, 1, 0, 0, 0, 0], [0, 1, 1, 1, 0, 0]]
  check_alignment(rows)


@pytest.mark.parametrize("packing", ["documents", "unpacked"])
def test_too_long_sample_names_its_source(packing):
  with pytest.raises(ValueError, match=r"f:2: the formatted sample has 9 tokens, more than seq_length=8"):
    pack_examples([doc(1, 3), doc(2, 9)], packing, 8)
  rows = pack_examples([doc(1, 3), doc(2, 9)], packing, 8, truncate=True)
  assert [21, 22, 23, 24, 25, 26, 27, 28] in rows.inputs_NxL.tolist()  # the last 8 tokens are kept


def test_pack_examples_checks_its_arguments():
  with pytest.raises(ValueError, match="packing='greedy'; choose one of esft, documents, unpacked"):
    pack_examples([doc(1, 3)], "greedy", 8)
  with pytest.raises(ValueError, match="seq_length=1"):
    pack_examples([doc(1, 3)], "esft", 1)
  with pytest.raises(ValueError, match="no examples"):
    pack_examples([], "documents", 8)


def test_padded_to_and_take():
  rows = pad_unpacked([doc(1, 3), doc(2, 5)], 6)
  padded = rows.padded_to(4)
  assert len(padded) == 4 and not padded.segment_ids_NxL[2:].any() and not padded.loss_mask_NxL[2:].any()
  assert padded.take(np.array([1]))[0]["inputs"].tolist() == rows[1]["inputs"].tolist()
