"""ESFT's JSONL formats: training conversations, evaluation items, and errors that name file and line."""

import pytest

from esft_jax.data.jsonl import Conversation, EvalItem, Turn, read_jsonl
from tests.data_helpers import chat, write_jsonl


def test_training_format_multi_turn_with_mask(tmp_path):
  path = write_jsonl(tmp_path / "t.jsonl", [chat("q1", "a1", "q2", "a2", mask=(0,)), "", chat("q3", "a3")])
  records = read_jsonl(path)
  assert records == [
      Conversation((Turn("q1", "a1", masked=True), Turn("q2", "a2")), f"{path}:1"),
      Conversation((Turn("q3", "a3"),), f"{path}:3"),  # the blank line 2 is skipped, line numbers are kept
  ]


def test_evaluation_format(tmp_path):
  path = write_jsonl(tmp_path / "e.jsonl", [{"idx": 0, "prompt": "User: x\n\nAssistant:", "answers": ["a"],
                                             "raw_answers": ["a."]}])
  assert read_jsonl(path) == [EvalItem("User: x\n\nAssistant:", ("a",), ("a.",), f"{path}:1")]


@pytest.mark.parametrize("lines,line,message", [
    ([chat("q", "a"), '{"messages": [}'], 2, "not valid JSON"),
    ([{"id": 1}], 1, "no 'messages'"),
    ([chat("q", "a"), {"prompt": "p", "answers": [], "raw_answers": []}], 2, "no 'messages'"),
    ([{"messages": []}], 1, "non-empty list"),
    ([{"messages": [{"role": "assistant", "content": "a"}]}], 1, "expected 'user'"),
    ([{"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]}], 1, "expected 'assistant'"),
    ([{"messages": [{"role": "system", "content": "s"}]}], 1, "role 'system'"),
    ([chat("q", "a", "q2")], 1, "no assistant answer"),
    ([{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}], 1, "must be a string"),
    ([{"messages": [{"role": "user", "content": "q", "mask": 1}, {"role": "assistant", "content": "a"}]}], 1,
     "only assistant messages take a mask"),
    ([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "mask": 2}]}], 1, "mask 2"),
    ([{"prompt": "p", "answers": "a", "raw_answers": []}], 1, "'answers' must be a list of strings"),
])
def test_bad_lines_name_file_and_line(tmp_path, lines, line, message):
  path = write_jsonl(tmp_path / "bad.jsonl", lines)
  with pytest.raises(ValueError, match=message) as error:
    read_jsonl(path)
  assert str(error.value).startswith(f"{path}:{line}: ")


def test_non_utf8_byte_names_file_and_line(tmp_path):
  path = tmp_path / "latin1.jsonl"
  path.write_bytes(b'{"prompt": "ok", "answers": ["a"]}\n{"prompt": "caf\xe9", "answers": ["b"]}\n')
  with pytest.raises(ValueError, match=r"not UTF-8 \(byte 0xe9 at column 16\)") as error:
    read_jsonl(path)
  assert str(error.value).startswith(f"{path}:2: ")


@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_empty_file(tmp_path, text):
  path = tmp_path / "empty.jsonl"
  path.write_text(text)
  with pytest.raises(ValueError, match=f"{path}: the file has no records"):
    read_jsonl(path)


def test_reference_files(esft_reference):
  train = read_jsonl(esft_reference / "datasets" / "intent_train.jsonl")
  assert len(train) == 7280 and all(isinstance(r, Conversation) and len(r.turns) == 1 for r in train)
  assert train[0].turns[0].user == "请分析下面这句话的意图，并转化为json格式： 美国片速度与激情播放一下呢\n答案："
  assert train[0].turns[0].assistant.endswith("}}。\n\n")
  evaluation = read_jsonl(esft_reference / "datasets" / "intent_eval.jsonl")
  assert len(evaluation) == 500 and evaluation[0].prompt.endswith("\n\nAssistant:")
  assert evaluation[0].source.endswith("intent_eval.jsonl:1")
