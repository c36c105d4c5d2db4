"""Tests of the demo's generated data: the six tasks and four general families (formats, splits, metrics), the
pretraining pool, the alignment mix and the general corpus."""

from __future__ import annotations

import json

import pytest

from esft_jax.data.formatting import user_piece
from esft_jax.demo import corpus
from esft_jax.demo.tasks import (ENHANCEMENT_TASKS, GENERAL_TASK_NAMES, TASK_NAMES, alignment_mix,
                                 in_pretraining_pool, make_all_tasks, make_general_tasks, make_task,
                                 pretraining_examples)
from esft_jax.evaluate.metrics import METRICS

# Code items run one interpreter each, so they are few; the other metrics are pure Python.
N_TEST = {"code": 6}


def _prompts(task) -> tuple[list[str], list[str]]:
  train = [user_piece(r["messages"][0]["content"]) for r in task.train]
  return train, [r.get("prompt", r.get("question")) for r in task.test]


# --- tasks ---------------------------------------------------------------------------------------------------


ALL = TASK_NAMES + GENERAL_TASK_NAMES


def test_tasks_are_the_six_of_the_paper_each_scored_by_its_metric():
  assert TASK_NAMES == ("math", "code", "intent", "summary", "law", "translation")
  assert ENHANCEMENT_TASKS == ("math", "code")
  tasks = make_all_tasks(n_train=3, n_test=2)
  assert list(tasks) == list(TASK_NAMES)
  assert all(task.metric in METRICS for task in tasks.values())
  general = make_general_tasks(n_train=3, n_test=2)
  assert list(general) == list(GENERAL_TASK_NAMES) and all(g.metric == "choice" for g in general.values())


def test_general_families_are_free_of_math_code_and_the_tasks_words():
  """The alignment data excludes math and code, as the paper's does, and shares no prompt with any task."""
  general = make_general_tasks(300, 50)
  task_prompts = {p for t in make_all_tasks(300, 50).values() for split in _prompts(t) for p in split}
  for family in general.values():
    for record in family.test:  # four distinct choices, the answer among them
      assert len(set(record["choices"])) == 4 and 0 <= record["answer"] < 4
    for record in family.train:
      text = record["messages"][0]["content"] + record["messages"][1]["content"]
      assert not any(c.isdigit() for c in text) and "def " not in text and "Python" not in text
    assert not (set(_prompts(family)[0]) | set(_prompts(family)[1])) & task_prompts


def test_alignment_mix_draws_from_the_general_train_splits():
  general = make_general_tasks(30, 5)
  mix = alignment_mix(general, 40, seed=0)
  pool = [r for g in general.values() for r in g.train]
  assert len(mix) == 40 and all(r in pool for r in mix)
  assert mix == alignment_mix(general, 40, seed=0) and mix != alignment_mix(general, 40, seed=1)
  with pytest.raises(ValueError, match="asks for 121 records but the general families hold 120"):
    alignment_mix(general, 121, seed=0)


@pytest.mark.parametrize("name", ALL)
def test_make_task_is_deterministic_per_seed(name):
  assert make_task(name, 20, 10, seed=0) == make_task(name, 20, 10, seed=0)
  other = make_task(name, 20, 10, seed=1)
  assert other.test != make_task(name, 20, 10, seed=0).test


@pytest.mark.parametrize("name", TASK_NAMES)
def test_records_are_in_esft_formats(name):
  task = make_task(name, 5, 5)
  for record in task.train:
    user, assistant = record["messages"]
    assert (user["role"], assistant["role"]) == ("user", "assistant")
    assert user["content"].strip() and assistant["content"].strip()
  for item in task.test:
    assert item["prompt"].startswith("User: ") and item["prompt"].endswith("\n\nAssistant:")
    assert item["answers"] == item["raw_answers"] and len(item["answers"]) == 1
  assert all("tests" in item for item in task.test) == (name == "code")


@pytest.mark.parametrize("name", ALL)
def test_no_prompt_is_in_both_splits_or_twice_in_one(name):
  train, test = _prompts(make_task(name, 1000, 200))
  assert len(set(train)) == len(train) == 1000 and len(set(test)) == len(test) == 200
  assert not set(train) & set(test)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_test_split_does_not_depend_on_train_size(name):
  assert make_task(name, 10, 8).test == make_task(name, 300, 8).test


def _wrong(name: str, answer: str) -> str:
  """The reference with the part that matters broken: final number, function body, intent, half the words."""
  if name == "math":
    steps, number = answer.rsplit(" ", 1)
    return f"{steps} {int(number) + 1}"
  if name == "code":
    return answer.split("return")[0] + "return None"
  if name == "intent":
    return json.dumps({**json.loads(answer), "intent": "Other"})
  words = answer.split()
  return " ".join(words[:len(words) // 2])


@pytest.mark.parametrize("name", TASK_NAMES)
def test_references_score_one_and_wrong_answers_less(name):
  task = make_task(name, 0, N_TEST.get(name, 50))
  score = METRICS[task.metric]
  for item in task.test:
    assert score(item["raw_answers"][0], item) == 1.0, item
    assert score(_wrong(name, item["raw_answers"][0]), item) < 1.0, item


def test_answers_and_prompts_are_short():
  """A tiny model generates every answer on a CPU: the design keeps answers under ~40 BPE tokens."""
  for task in make_all_tasks(200, 0).values():
    assert max(len(r["messages"][1]["content"]) for r in task.train) <= 120, task.name
    assert max(len(r["messages"][0]["content"]) for r in task.train) <= 200, task.name


@pytest.mark.parametrize("name", ENHANCEMENT_TASKS)
def test_pretraining_examples_come_from_a_pool_no_task_split_draws_from(name):
  examples = pretraining_examples(name, 100)
  prompts = [user_piece(r["messages"][0]["content"]) for r in examples]
  assert len(set(prompts)) == 100 and all(in_pretraining_pool(p) for p in prompts)
  assert examples == pretraining_examples(name, 100)
  for seed in (0, 1):
    train, test = _prompts(make_task(name, 300, 100, seed))
    assert not set(prompts) & (set(train) | set(test))
    assert not any(in_pretraining_pool(p) for p in train + test)


def test_unknown_task_and_too_many_items_raise():
  with pytest.raises(ValueError, match="unknown demo task 'poetry'"):
    make_task("poetry", 1, 1)
  with pytest.raises(ValueError, match="grammar is too small"):
    make_task("intent", 10_000, 10)


# --- general corpus --------------------------------------------------------------------------------------------


def test_general_texts_are_deterministic_bounded_and_hold_prose_and_code():
  texts = corpus.general_texts(50_000, seed=0)
  assert texts == corpus.general_texts(50_000, seed=0)
  assert texts != corpus.general_texts(50_000, seed=1)
  assert 40_000 < sum(map(len, texts)) <= 50_000
  assert all(corpus.MIN_CHUNK_CHARS <= len(t) <= corpus.CHUNK_CHARS for t in texts)
  code = [t for t in texts if "def " in t or "return " in t or "import " in t]
  assert len(code) > len(texts) // 4
  assert len(code) < 3 * len(texts) // 4
  assert any(t.count(" the ") >= 3 for t in texts)


def test_general_split_is_disjoint_and_stable():
  train, held_out = corpus.general_split(100_000, 20_000, seed=0)
  assert train and held_out and not set(train) & set(held_out)
  assert sum(map(len, held_out)) <= 20_000
  bigger_train, _ = corpus.general_split(300_000, 20_000, seed=3)
  assert not set(bigger_train) & set(held_out)


def test_chunk_prefers_paragraphs_and_bounds_length():
  text = "\n\n".join(f"Paragraph {i} " + " ".join(["word"] * 30) for i in range(5)) + "\n\n" + "x" * 1000
  pieces = corpus.chunk(text, chunk_chars=200)
  assert all(len(p) <= 200 for p in pieces)
  assert pieces[0].startswith("Paragraph 0") and pieces[0].endswith("word")
  assert "".join(pieces).count("x") == 1000
