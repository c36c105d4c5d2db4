"""The grain pipeline: deterministic, resumable from a JSON-able state, sharded by process, split 98/2."""

import json

import numpy as np
import pytest

from esft_jax.data.formatting import Example
from esft_jax.data.packing import pad_unpacked
from esft_jax.data.pipeline import DataConfig, build_datasets, eval_dataset, split_rows, train_dataset
from tests.data_helpers import chat, tiny_tokenizer, write_jsonl

KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def rows(n: int, seq_length: int = 8):
  """n unpacked rows; row i starts with token i + 1, so rows are told apart by their first token."""
  return pad_unpacked([Example(np.array([i + 1, 7, 8], np.int32), np.array([0, 1, 1], bool), f"f:{i}")
                       for i in range(n)], seq_length)


def first_tokens(batches):
  return [b["inputs"][:, 0].tolist() for b in batches]


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_same_seed_same_batches():
  a = take(iter(train_dataset(rows(20), 4, seed=3, process_index=0, process_count=1)), 12)
  b = take(iter(train_dataset(rows(20), 4, seed=3, process_index=0, process_count=1)), 12)
  c = take(iter(train_dataset(rows(20), 4, seed=4, process_index=0, process_count=1)), 12)
  assert first_tokens(a) == first_tokens(b) != first_tokens(c)
  assert all(b.keys() == set(KEYS) and b["inputs"].shape == (4, 8) for b in a)
  assert a[0]["loss_mask"].dtype == np.float32 and a[0]["inputs"].dtype == np.int32
  epoch_1, epoch_2 = sum(first_tokens(a[:5]), []), sum(first_tokens(a[5:10]), [])
  assert sorted(epoch_1) == sorted(epoch_2) == list(range(1, 21)) and epoch_1 != epoch_2  # reshuffled per epoch


def test_restore_mid_stream_gives_the_same_remaining_batches():
  dataset = train_dataset(rows(20), 4, seed=3, process_index=0, process_count=1)
  uninterrupted = take(iter(dataset), 15)
  iterator = iter(dataset)
  take(iterator, 7)
  state = json.loads(json.dumps(iterator.get_state()))  # as stored in a checkpoint
  resumed = iter(train_dataset(rows(20), 4, seed=3, process_index=0, process_count=1))
  resumed.set_state(state)
  for expected, got in zip(uninterrupted[7:], take(resumed, 8)):
    for key in KEYS:
      np.testing.assert_array_equal(expected[key], got[key])


def test_two_processes_partition_the_rows():
  shards = [list(train_dataset(rows(20), 4, seed=3, num_epochs=1, process_index=p, process_count=2))
            for p in range(2)]
  seen = [sum(first_tokens(s), []) for s in shards]
  assert all(len(s) == 5 and b["inputs"].shape == (2, 8) for s in shards for b in s)
  assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(1, 21))
  with pytest.raises(ValueError, match="global_batch_size=3 must be a positive multiple of the 2 processes"):
    train_dataset(rows(20), 3, seed=3, process_index=0, process_count=2)


def test_eval_batches_cover_every_row_once_with_equal_counts():
  shards = [list(eval_dataset(rows(7), 4, process_index=p, process_count=2)) for p in range(2)]
  assert [len(s) for s in shards] == [2, 2]
  real = [t for s in shards for b in s for t, seg in zip(b["inputs"][:, 0], b["segment_ids"][:, 0]) if seg]
  assert sorted(real) == list(range(1, 8))
  padding = [b["loss_mask"][i] for s in shards for b in s for i in range(2) if not b["segment_ids"][i, 0]]
  assert len(padding) == 1 and not padding[0].any()


def test_split_is_98_2_and_disjoint():
  train, validation = split_rows(rows(115), 0.02, seed=0)
  assert (len(train), len(validation)) == (112, 3)  # int(115 * 0.98), as torch's random_split is called
  assert sorted(train.inputs_NxL[:, 0].tolist() + validation.inputs_NxL[:, 0].tolist()) == list(range(1, 116))
  with pytest.raises(ValueError, match="leave none for training"):
    split_rows(rows(1), 0.5, seed=0)


def test_build_datasets_from_jsonl(tmp_path):
  tokenizer = tiny_tokenizer(tmp_path / "tok")
  records = [chat(f"what is {i} plus two?", f"{i + 2}") for i in range(60)]
  path = write_jsonl(tmp_path / "t.jsonl", records)
  config = DataConfig(seq_length=64, packing="documents", validation_fraction=0.1)
  datasets = build_datasets(path, tokenizer, config, 2, process_index=0, process_count=1)
  n_targets = sum(len(tokenizer.encode(" " + r["messages"][1]["content"])) + 1 for r in records)
  assert datasets.train_rows.loss_mask_NxL.sum() + datasets.validation_rows.loss_mask_NxL.sum() == n_targets
  batch = next(iter(datasets.train))
  assert batch["inputs"].shape == (2, 64)
  assert (batch["segment_ids"].max(axis=1) > 1).all()  # several documents per row
  assert len(list(datasets.validation)) == -(-len(datasets.validation_rows) // 2)


def test_reference_file_packs_like_esft(esft_reference, tmp_path):
  tokenizer = tiny_tokenizer(tmp_path / "tok")
  datasets = build_datasets(esft_reference / "datasets" / "intent_train.jsonl", tokenizer, DataConfig(), 4,
                            process_index=0, process_count=1)
  n = len(datasets.train_rows) + len(datasets.validation_rows)
  assert len(datasets.train_rows) == int(n * 0.98)
  assert (datasets.train_rows.segment_ids_NxL[:-1] <= 1).all()  # one segment per row: documents see each other
