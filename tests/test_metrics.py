"""Tests of the evaluation metrics: intent against ESFT's released scores, the rest on hand-checked cases and,
where sacrebleu / rouge-score are installed, against them as oracles."""

from __future__ import annotations

import functools
import json
import random
import time

import pytest

from esft_jax.evaluate import metrics
from esft_jax.evaluate.judge import JudgeRubric, judge_prompt, llm_judge, parse_judge_score
from esft_jax.evaluate.metrics import (
    METRICS, chrf, code_pass_at_1, extract_code, extract_math_answer, intent_exact_match, intent_prediction_text,
    lcs_length, math_accuracy, multiple_choice_accuracy, rouge_l, rouge_tokens, score_completions, translation_chrf)

# --- intent ------------------------------------------------------------------------------------------------


def test_intent_reproduces_released_gate_scores_item_by_item(esft_reference):
  path = esft_reference / "intent" / "completions_gate.jsonl"
  stored = [json.loads(line)["score"] for line in path.read_text(encoding="utf-8").splitlines()]
  mean, scores = score_completions(path, "intent")
  assert len(scores) == len(stored) == 500
  assert [i for i, (ours, theirs) in enumerate(zip(scores, stored)) if ours != theirs] == []
  assert mean == pytest.approx(0.800, abs=1e-12)


def test_intent_eval_references_score_themselves(esft_reference):
  """Every reference parses and a verbatim answer (with the training data's "。") is right, except where a
  reference value has a space: ESFT removes spaces from predicted values only, so no answer can match it."""
  wrong = []
  for line in (esft_reference / "datasets" / "intent_eval.jsonl").read_text(encoding="utf-8").splitlines():
    item = json.loads(line)
    if intent_exact_match(" " + item["raw_answers"][0] + "。\n\n", item) != 1.0:
      wrong.append(item["idx"])
  assert wrong == [339]  # "name": "去年在成团夜唱的bang bang"


INTENT_ANSWER = '{"intent": "Alarm-Update", "slots": {"datetime_date": ["17号", "18号"], "notes": "买眼镜"}}'
INTENT_ITEM = {"raw_answers": [INTENT_ANSWER], "answers": [INTENT_ANSWER]}


@pytest.mark.parametrize("prediction, expected", [
    (INTENT_ANSWER, 1.0),
    (" " + INTENT_ANSWER + "。", 1.0),  # Chinese full stop, as the model writes it
    (INTENT_ANSWER + ".", 1.0),  # trailing period
    (INTENT_ANSWER + "。\n\n请分析下面这句话的意图", 1.0),  # first non-empty line only
    ("\n\n" + INTENT_ANSWER, 1.0),
    ("```json\n" + INTENT_ANSWER + "\n```", 1.0),  # fence: its inside
    ("Here it is:\n```json\n" + INTENT_ANSWER + "\n```\nDone.", 1.0),
    ("```json\n" + INTENT_ANSWER, 0.0),  # unclosed fence -> "{}"
    (INTENT_ANSWER.replace('["17号", "18号"]', '["18号", "17号"]'), 1.0),  # list values are sets
    (INTENT_ANSWER.replace('"买眼镜"', '"买 眼 镜"'), 1.0),  # spaces are removed from predicted values
    (INTENT_ANSWER.replace('["17号", "18号"]', '["17 号", "18号"]'), 1.0),  # ... and predicted list items
    (INTENT_ANSWER.replace('"Alarm-Update"', '"Alarm-Query"'), 0.0),
    (INTENT_ANSWER.replace(', "notes": "买眼镜"', ""), 0.0),  # missing slot
    (INTENT_ANSWER.replace('}}', ', "city": "北京"}}'), 0.0),  # extra slot
    (INTENT_ANSWER.replace('"买眼镜"', "5"), 0.0),  # non-string value
    ('{"intent": "Alarm-Update", "slots": []}', 0.0),
    ('["Alarm-Update"]', 0.0),
    ("{'intent': 'Alarm-Update'}", 0.0),  # not JSON
    ("", 0.0),  # -> "None"
    ("```json\n\n\n```", 0.0),
])
def test_intent_edge_cases(prediction, expected):
  assert intent_exact_match(prediction, INTENT_ITEM) == expected


def test_intent_spaces_are_kept_in_reference_values():
  item = {"raw_answers": ['{"intent": "Music-Play", "slots": {"song": "bang bang"}}']}
  assert intent_exact_match('{"intent": "Music-Play", "slots": {"song": "bang bang"}}', item) == 0.0
  assert intent_exact_match('{"intent": "Music-Play", "slots": {"song": "bangbang"}}', item) == 0.0


def test_intent_missing_slots_are_no_slots():
  no_slots = {"raw_answers": ['{"intent": "Music-Play", "slots": {}}']}
  assert intent_exact_match('{"intent": "Music-Play"}', no_slots) == 1.0


def test_intent_post_processing_steps():
  assert intent_prediction_text("  ") == "None"
  assert intent_prediction_text(".{}。\n") == "{}"
  assert intent_prediction_text("```json\n{}\n```") == "{}"
  assert intent_prediction_text("```json\n{}") == "{}"
  assert intent_prediction_text("{}。\n.") == "{}"


def test_intent_bad_reference_is_an_error():
  with pytest.raises(ValueError, match="not JSON"):
    intent_exact_match("{}", {"raw_answers": ["not json"]})
  with pytest.raises(ValueError, match="no reference"):
    intent_exact_match("{}", {"prompt": "x"})


# --- math --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("so the total is \\boxed{\\frac{3}{4}} in all", "\\frac{3}{4}"),
    ("\\boxed{x^{2}+1} and later \\boxed{7}", "x^{2}+1"),
    ("She pays 5 + 13 = 18.\n#### 18\n\nQuestion: Tom has 3", "18"),
    ("5 + 13 = 18. The answer is 18.\n\nQuestion: x. The answer is 7.", "18"),
    ("The final answer is: $1,250.", "$1,250"),
    ("First 12 apples, then 30 pears, 42 in total.", "42"),
    ("it drops to -3.5 degrees", "-3.5"),
    ("no digits here", None),
])
def test_extract_math_answer(text, expected):
  assert extract_math_answer(text) == expected


@pytest.mark.parametrize("prediction, reference, expected", [
    ("The answer is 18.", "18", 1.0),
    ("The answer is 18 dollars.", "18", 1.0),
    ("The answer is $1,250.", "1250", 1.0),
    ("#### 1250.00", "1,250", 1.0),
    ("The answer is 0.75.", "\\frac{3}{4}", 1.0),
    ("\\boxed{3/4}", "0.75", 1.0),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", 1.0),
    ("\\boxed{0.33333}", "1/3", 1.0),
    ("\\boxed{0.333}", "1/3", 0.0),
    ("The answer is 1 3/4.", "3.25", 0.0),  # a mixed number, not 13/4
    ("The answer is 1234.5.", "1234.7", 0.0),
    ("\\boxed{25\\%}", "25", 1.0),
    ("\\boxed{x^2 + 1}", "x^2+1", 1.0),
    ("The answer is 17.", "18", 0.0),
    ("The answer is 1,2.", "12", 0.0),
    ("The answer is 18", "Natalia sold 48/2 = 24 clips in May.\n#### 18", 1.0),
    ("The answer is 5", "so \\boxed{5}.", 1.0),
    ("nothing", "5", 0.0),
])
def test_math_accuracy(prediction, reference, expected):
  assert math_accuracy(prediction, {"answer": reference}) == expected


def test_math_accepts_any_of_several_answers_and_numeric_answer():
  assert math_accuracy("The answer is 4.", {"answers": ["3", "4"]}) == 1.0
  assert math_accuracy("The answer is 4.", {"answer": 4}) == 1.0


# --- code --------------------------------------------------------------------------------------------------

ADD_TESTS = {"tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]}


def test_code_pass_and_fail():
  assert code_pass_at_1("```python\ndef add(a, b):\n  return a + b\n```\nThis adds.", ADD_TESTS) == 1.0
  assert code_pass_at_1("def add(a, b):\n  return a - b\n", ADD_TESTS) == 0.0


def test_a_chat_answer_runs_after_its_separating_space_and_a_continuation_keeps_its_indent():
  # Generations continue "...Assistant:", so a whole function comes as " def ...".
  assert code_pass_at_1(" def add(a, b):\n  return a + b", ADD_TESTS) == 1.0
  continuation = {**ADD_TESTS, "code_prefix": "def add(a, b):\n"}
  assert code_pass_at_1("  return a + b", continuation) == 1.0
  assert code_pass_at_1("return a + b", continuation) == 0.0  # the body's indent is the model's to write


def test_code_syntax_error_and_missing_function():
  assert code_pass_at_1("```python\ndef add(a, b) return a + b\n```", ADD_TESTS) == 0.0
  assert code_pass_at_1("print('no function')", ADD_TESTS) == 0.0


def test_code_timeout_is_a_failure():
  start = time.monotonic()
  item = {"tests": "assert add(1, 2) == 3", "timeout_s": 1.0}
  assert code_pass_at_1("import time\ntime.sleep(30)\ndef add(a, b):\n  return a + b", item) == 0.0
  assert time.monotonic() - start < 10


def test_data_cannot_raise_the_code_timeout_past_the_cap(monkeypatch):
  monkeypatch.setattr(metrics, "MAX_CODE_TIMEOUT_S", 1.0)
  start = time.monotonic()
  item = {"tests": "pass", "timeout_s": 1000}
  assert code_pass_at_1("import time\ntime.sleep(60)", item) == 0.0
  assert time.monotonic() - start < 10
  for bad in (0, -1, "5", True):
    with pytest.raises(ValueError, match="'timeout_s' must be a positive number of seconds"):
      code_pass_at_1("pass", {"tests": "pass", "timeout_s": bad})


def test_code_network_is_blocked():
  tests = "import socket\ntry:\n  socket.create_connection(('127.0.0.1', 9))\nexcept PermissionError:\n  pass\n" \
          "else:\n  raise SystemExit(1)"
  assert code_pass_at_1("import ssl, urllib.request", {"tests": tests}) == 1.0
  assert code_pass_at_1("import _socket\n_socket.socket()", {"tests": "pass"}) == 0.0


def test_code_runs_in_a_scratch_cwd_with_a_minimal_env(monkeypatch):
  monkeypatch.setenv("ESFT_SECRET", "1")
  tests = "import os, tempfile\nassert os.getcwd() == os.path.realpath(tempfile.gettempdir())\n" \
          "assert 'ESFT_SECRET' not in os.environ"
  assert code_pass_at_1("", {"tests": tests}) == 1.0


def test_code_prefix_for_completion_style_generations():
  humaneval_test = "def check(candidate):\n  assert candidate(2, 2) == 4\n\ncheck(add)"
  item = {"code_prefix": "def add(a, b):\n", "tests": humaneval_test}
  assert code_pass_at_1("  return a + b\n", item) == 1.0


def test_extract_code_prefers_python_fences():
  assert extract_code("```text\nx\n```\n```python\ny = 1\n```") == "y = 1\n"
  assert extract_code("```\nz = 2\n```") == "z = 2\n"
  assert extract_code("```python\ncut off") == "cut off"
  assert extract_code("  return a\n") == "  return a\n"


def test_code_item_without_tests_is_an_error():
  with pytest.raises(ValueError, match="tests"):
    code_pass_at_1("pass", {"answer": "x"})


# --- chrF and ROUGE-L --------------------------------------------------------------------------------------


def test_chrf_hand_checked():
  assert chrf("the cat sat", "the cat sat") == 1.0
  assert chrf("abc", "xyz") == 0.0
  assert chrf("", "abc") == 0.0
  # n=1: P 2/2, R 2/3; n=2: P 1/1, R 1/2; n>=3 absent from "ab". P=1, R=7/12, F2 = 5PR/(4P+R) = 7/11.
  assert chrf("ab", "abc") == pytest.approx(7 / 11)
  assert chrf("a b", "ab") == 1.0  # whitespace is ignored


def test_rouge_l_hand_checked():
  assert rouge_l("the cat sat", "the cat sat") == 1.0
  assert rouge_l("a b c", "x y z") == 0.0
  assert rouge_l("", "x") == 0.0
  assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
  assert rouge_l("The CAT", "the cat") == 1.0
  assert rouge_tokens("判决如下：Yes, OK") == ["判", "决", "如", "下", "：", "yes,", "ok"]
  assert rouge_l("我爱北京", "我爱上海") == pytest.approx(0.5)


def _lcs_table(a: list, b: list) -> int:
  table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
  for i, x in enumerate(a):
    for j, y in enumerate(b):
      table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
  return table[-1][-1]


def test_bit_parallel_lcs_matches_the_dynamic_programme():
  rng = random.Random(0)
  for _ in range(500):
    a = [rng.choice("abcde") for _ in range(rng.randint(0, 40))]
    b = [rng.choice("abcde") for _ in range(rng.randint(0, 40))]
    assert lcs_length(a, b) == _lcs_table(a, b)


def test_translation_scores_the_first_paragraph_against_the_best_reference():
  item = {"answers": ["completely different", "the river is wide"]}
  assert translation_chrf("the river is wide\n\nCherokee: ...", item) == 1.0


WORDS = ["the", "a", "river", "wide", "cat", "sat", "on", "mat", "is", "was", "dog", "ran", "1984", "ok", "Hello",
         "world!", "don't", "(yes)", "naïve", "東京"]


def _random_pairs(seed: int, count: int = 300) -> list[tuple[str, str]]:
  rng = random.Random(seed)
  sentence = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 15)))
  return [(sentence(), sentence()) for _ in range(count)]


def test_chrf_matches_sacrebleu():
  sacrebleu = pytest.importorskip("sacrebleu")
  for hypothesis, reference in _random_pairs(1):
    expected = sacrebleu.sentence_chrf(hypothesis, [reference]).score / 100
    assert chrf(hypothesis, reference) == pytest.approx(expected, abs=1e-9), (hypothesis, reference)


def test_rouge_l_matches_rouge_score():
  rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")

  class Tokenizer:
    tokenize = staticmethod(rouge_tokens)

  ours_tokenized = rouge_scorer.RougeScorer(["rougeL"], tokenizer=Tokenizer())
  default = rouge_scorer.RougeScorer(["rougeL"])
  for prediction, reference in _random_pairs(2):
    expected = ours_tokenized.score(reference, prediction)["rougeL"].fmeasure
    assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-12), (prediction, reference)
  simple = [w.lower() for w in WORDS[:14]]  # lowercase ASCII words: rouge-score's tokenizer agrees with ours
  rng = random.Random(3)
  for _ in range(300):
    prediction, reference = (" ".join(rng.choice(simple) for _ in range(rng.randint(1, 15))) for _ in range(2))
    expected = default.score(reference, prediction)["rougeL"].fmeasure
    assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-12)


# --- registry and completions files ------------------------------------------------------------------------


@pytest.mark.parametrize("name, prediction, item", [
    ("intent", '{"intent": "A", "slots": {}}', {"raw_answers": ['{"intent": "A", "slots": {}}']}),
    ("math", "The answer is 3.", {"answers": ["3"]}),
    ("code", "x = 1", {"tests": "assert x == 1"}),
    ("translation", "the river", {"answers": ["the river"]}),
    ("summary", "客户来电咨询", {"raw_answers": ["客户来电咨询"]}),
    ("law", "判决如下", {"answer": "判决如下"}),
])
def test_every_registered_metric_scores_a_right_answer_one(name, prediction, item):
  assert METRICS[name](prediction, item) == 1.0
  assert METRICS[name]("", item) == 0.0


def test_flat_completions_format(tmp_path):
  path = tmp_path / "math.jsonl"
  rows = [{"prediction": "The answer is 3.", "answers": ["3"]}, {"prediction": "The answer is 4.", "answer": "5"}]
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
  assert score_completions(path, "math") == (0.5, [1.0, 0.0])
  assert score_completions(path, lambda prediction, item: 0.25) == (0.25, [0.25, 0.25])


def test_results_of_eval_are_rescored(tmp_path):
  """The results JSON that `esft-jax eval --out` writes re-scores as completions, item by item."""
  items = [{"example": {"prompt": "p", "raw_prediction": f"The answer is {n}.", "raw_answers": ["3"]},
            "score": float(n == 3), "source": "s"} for n in (3, 4)]
  path = tmp_path / "r.json"
  path.write_text(json.dumps({"metric": "math", "mean": 0.5, "items": items}, indent=1), encoding="utf-8")
  assert score_completions(path, "math") == (0.5, [1.0, 0.0])
  items[1]["example"].pop("raw_prediction")
  path.write_text(json.dumps({"metric": "math", "mean": 0.5, "items": items}), encoding="utf-8")
  with pytest.raises(ValueError, match=r"r\.json: items\[1\]: .*raw_prediction"):
    score_completions(path, "math")


@pytest.mark.parametrize("second_line, message", [
    ('{"prediction": "x", "answers": ["1"]', "not valid JSON"),
    ('{"answers": ["1"]}', "expected ESFT's"),
    ('["x"]', "found list"),
    ('{"example": {"prompt": "p", "raw_answers": ["1"]}}', "raw_prediction"),
    ('{"prediction": 3, "answers": ["1"]}', "must be a string"),
    ('{"prediction": "x"}', "no reference"),
])
def test_malformed_completions_name_file_and_line(tmp_path, second_line, message):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"prediction": "The answer is 1", "answers": ["1"]}\n' + second_line + "\n", encoding="utf-8")
  with pytest.raises(ValueError, match=rf"bad\.jsonl:2: .*{message}"):
    score_completions(path, "math")


def test_empty_completions_file_and_unknown_metric(tmp_path):
  path = tmp_path / "empty.jsonl"
  path.write_text("\n", encoding="utf-8")
  with pytest.raises(ValueError, match="no completions"):
    score_completions(path, "math")
  with pytest.raises(ValueError, match="unknown metric 'bleu'"):
    score_completions(path, "bleu")


# --- multiple choice ---------------------------------------------------------------------------------------


def test_multiple_choice_accuracy():
  assert multiple_choice_accuracy([-5.0, -2.0, -9.0], 1) == 1.0
  assert multiple_choice_accuracy([-5.0, -2.0, -9.0], 0) == 0.0
  # Length normalisation flips the choice: -6/12 = -0.5 beats -2/2 = -1.
  assert multiple_choice_accuracy([-6.0, -2.0], 0, lengths=[12, 2]) == 1.0
  assert multiple_choice_accuracy([-1.0, -1.0], 0) == 1.0  # ties go to the lowest index
  with pytest.raises(ValueError, match="out of range"):
    multiple_choice_accuracy([-1.0, -2.0], 2)
  with pytest.raises(ValueError, match="lengths"):
    multiple_choice_accuracy([-1.0, -2.0], 0, lengths=[1])


# --- LLM judge (fake transport, no network) ----------------------------------------------------------------


def _chat_response(content: str) -> bytes:
  return json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()


def test_judge_request_and_score():
  sent = []

  def transport(url, body, headers, timeout_s):
    sent.append((url, json.loads(body), headers, timeout_s))
    return _chat_response("相关性扣1分，完整性扣1分，准确性扣0分，客观性与专业性扣0分，总分是：8分")

  item = {"raw_answers": ["驳回原告诉讼请求。", "unused"]}
  score = llm_judge("  判决如下\n\n再审  ", item, "http://judge.local/v1/", "law", model="judge-model",
                    api_key="k", transport=transport)
  assert score == pytest.approx(0.8)
  url, body, headers, timeout_s = sent[0]
  assert url == "http://judge.local/v1/chat/completions"
  assert headers["Authorization"] == "Bearer k"
  assert body["model"] == "judge-model" and body["max_tokens"] == 80
  assert [m["role"] for m in body["messages"]] == ["system", "user"]
  assert "预测答案：判决如下\n\n再审\n参考答案：驳回原告诉讼请求。" in body["messages"][1]["content"]


def test_judge_prompt_for_translation_keeps_first_paragraph_and_fills_none():
  prompt = judge_prompt("The river is wide.\n\nCherokee: next shot", {"answers": ["The river is broad."]},
                        "translation")
  assert "Predicted answer: The river is wide.\n\nReference answer: The river is broad." in prompt
  assert "Predicted answer: None\n" in judge_prompt("   ", {"answers": ["x"]}, "translation")
  custom = JudgeRubric(template="P={prediction} G={ground_truth}", score_pattern=r"(\d+)/10")
  assert judge_prompt("a {b}", {"answer": "c"}, custom) == "P=a {b} G=c"


@pytest.mark.parametrize("response, rubric, expected", [
    ("内容准确性扣1分，总分是：6.5分", "summary", 0.65),
    ("Content accuracy 8 points, completeness 7 points, redundancy 9 points, total score: 8 points", "translation",
     0.8),
    ("total score:12 points", "translation", 1.0),
    ("I cannot score this.", "summary", 0.0),
])
def test_parse_judge_score(response, rubric, expected):
  assert parse_judge_score(response, rubric) == pytest.approx(expected)


def test_judge_retries_then_raises_and_rejects_bad_responses():
  calls = []

  def failing(url, body, headers, timeout_s):
    calls.append(url)
    raise ConnectionRefusedError("refused")

  with pytest.raises(RuntimeError, match="failed 3 times"):
    llm_judge("x", {"answer": "y"}, "http://judge.local/v1", "summary", retries=3, retry_sleep_s=0,
              transport=failing)
  assert len(calls) == 3
  with pytest.raises(ValueError, match="no chat completion"):
    llm_judge("x", {"answer": "y"}, "http://judge.local/v1", "summary", transport=lambda *a: b'{"error": "x"}')


def test_judge_binds_into_score_completions(tmp_path):
  path = tmp_path / "summary.jsonl"
  path.write_text(json.dumps({"example": {"prompt": "p", "raw_prediction": "s", "raw_answers": ["r"]}, "score": 0}),
                  encoding="utf-8")
  judge = functools.partial(llm_judge, endpoint="http://judge.local/v1", rubric="summary",
                            transport=lambda *a: _chat_response("总分是：7分"))
  assert score_completions(path, judge) == (pytest.approx(0.7), [pytest.approx(0.7)])


def test_unknown_rubric():
  with pytest.raises(ValueError, match="unknown judge rubric"):
    judge_prompt("x", {"answer": "y"}, "poetry")


def test_module_has_no_network_default_in_metrics():
  assert llm_judge not in METRICS.values()
