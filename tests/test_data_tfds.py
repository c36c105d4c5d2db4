"""TFDS datasets of our JSONL files, built offline as ArrayRecord without TensorFlow, read back through the same
`open_examples` as JSONL."""

import numpy as np
import pytest

from esft_jax.data.jsonl import read_jsonl
from esft_jax.data.packing import pack_examples
from esft_jax.data.pipeline import format_records
from esft_jax.data.sources import open_examples
from esft_jax.data.tfds_builder import open_source, parse_spec, prepare_tfds
from tests.data_helpers import chat, tiny_tokenizer, write_jsonl

CHATS = [chat("q1 中文", "a1\n", "q2", "a2", mask=(0,)), chat("  spaced  ", "  answer  "), chat("x", "")]
EVAL = [{"idx": 0, "prompt": "User: p\n\nAssistant:", "answers": ["a", "b"], "raw_answers": ["a."]},
        {"idx": 1, "prompt": "User: q\n\nAssistant:", "answers": [], "raw_answers": []}]


@pytest.mark.parametrize("records,config", [(CHATS, None), (EVAL, "few_shot")])
def test_build_and_read_back_the_same_records(tmp_path, records, config):
  path = write_jsonl(tmp_path / "data.jsonl", records)
  folder = prepare_tfds(path, "tiny", tmp_path / "tfds", config=config)
  assert any(f.name.startswith("tiny-train.array_record") for f in folder.iterdir())
  spec = f"tfds:tiny{'/' + config if config else ''}:train"
  assert len(open_source(spec, tmp_path / "tfds")) == len(records)
  from_tfds = open_examples(spec, tmp_path / "tfds")
  from_jsonl = open_examples(path)
  assert [from_tfds[i] for i in range(len(records))] == [from_jsonl[i] for i in range(len(records))]


def test_tfds_and_jsonl_pack_the_same(tmp_path):
  path = write_jsonl(tmp_path / "data.jsonl", CHATS * 5)
  prepare_tfds(path, "tiny", tmp_path / "tfds")
  tokenizer = tiny_tokenizer(tmp_path / "tok")
  packed = [pack_examples(format_records(open_examples(spec, tmp_path / "tfds"), tokenizer), "esft", 16)
            for spec in (str(path), "tfds:tiny:train")]
  np.testing.assert_array_equal(packed[0].inputs_NxL, packed[1].inputs_NxL)
  np.testing.assert_array_equal(packed[0].loss_mask_NxL, packed[1].loss_mask_NxL)


def test_rebuild_needs_overwrite(tmp_path):
  path = write_jsonl(tmp_path / "data.jsonl", CHATS)
  prepare_tfds(path, "tiny", tmp_path / "tfds")
  with pytest.raises(FileExistsError, match="already built"):
    prepare_tfds(path, "tiny", tmp_path / "tfds")
  write_jsonl(path, CHATS[:1])
  prepare_tfds(path, "tiny", tmp_path / "tfds", overwrite=True)
  assert len(open_examples("tfds:tiny:train", tmp_path / "tfds")) == 1


def test_bad_specs_and_missing_datasets(tmp_path):
  assert parse_spec("tfds:intent/chat:train[:90%]") == ("intent/chat", "train[:90%]")
  for spec in ("tfds:intent", "tfds::train", "tfds:intent:"):
    with pytest.raises(ValueError, match="expected tfds:NAME"):
      parse_spec(spec)
  with pytest.raises(ValueError, match="'Intent' must be snake_case"):
    parse_spec("tfds:Intent:train")
  with pytest.raises(FileNotFoundError, match="tfds:nothing:train: no TFDS dataset nothing"):
    open_examples("tfds:nothing:train", tmp_path)
  path = write_jsonl(tmp_path / "data.jsonl", CHATS)
  prepare_tfds(path, "tiny", tmp_path / "tfds")
  with pytest.raises(ValueError, match="tfds:tiny:validation: Unknown split"):
    open_examples("tfds:tiny:validation", tmp_path / "tfds")
  with pytest.raises(ValueError, match=r"data\.jsonl:1: no 'messages'"):
    prepare_tfds(write_jsonl(path, [{"id": 1}]), "bad", tmp_path / "tfds")


def test_reference_eval_file(esft_reference, tmp_path):
  path = esft_reference / "datasets" / "intent_eval.jsonl"
  prepare_tfds(path, "intent_eval", tmp_path)
  items = open_examples("tfds:intent_eval:train", tmp_path)
  assert [items[i] for i in (0, 499)] == [read_jsonl(path)[i] for i in (0, 499)]
