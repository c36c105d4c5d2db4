"""The scores of the paper's evaluations, one pure `score(prediction, item) -> float` in [0, 1] per task.

`prediction` is the raw generated text; `item` is the eval item it answers. References are read from
"raw_answers" (ESFT's eval files; its evaluators score against raw_answers[0]), else "answers" (a list),
else "answer". Code items carry their tests in "tests". METRICS maps task names to these functions and
`score_completions` re-scores a saved completions file with any of them.

ESFT's own evaluators (deepseek-ai/ESFT, benchmarks.py) exist only for intent (exact match, reproduced here
exactly) and for summary, law and translation, which it scores with a GPT-4 judge. The judge is available
as the opt-in `llm_judge`; the registered defaults for those tasks are the reference-based chrF and ROUGE-L,
which need no network. Math, code and multiple choice are not in the release; they follow GSM8K/MATH,
HumanEval/MBPP and lm-evaluation-harness conventions.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

Metric = Callable[[str, dict], float]


def references(item: dict) -> list[str]:
  """The item's reference answers, in order; numbers are accepted and turned into strings."""
  for key in ("raw_answers", "answers", "answer"):
    if key not in item:
      continue
    refs = item[key] if isinstance(item[key], list) else [item[key]]
    if not refs or not all(isinstance(r, (str, int, float)) and not isinstance(r, bool) for r in refs):
      raise ValueError(f"eval item field {key!r} must be a string, a number or a non-empty list of them, "
                       f"got {item[key]!r}")
    return [r if isinstance(r, str) else str(r) for r in refs]
  raise ValueError(f"eval item has no reference: expected 'raw_answers', 'answers' or 'answer' among its "
                   f"keys {sorted(item)}")


# --- intent: ESFT's IntentEvaluator ---------------------------------------------------------------------


def intent_prediction_text(raw_prediction: str) -> str:
  """ESFT's post-processing of an intent generation, step by step; the released scores depend on each one.

  Lines are split on "\\n" only and a line is empty only when it is "", as in ESFT. Where ESFT would raise
  (a fence holding nothing but newlines) this returns "", which then fails to parse and scores 0.
  """
  pred = raw_prediction.strip() or "None"
  pred = pred.strip(".。")
  if "```json" in pred:
    inside = pred[pred.index("```json") + len("```json"):]
    pred = inside[:inside.index("```")] if "```" in inside else "{}"
  if "\n" in pred:
    lines = [line for line in pred.split("\n") if line]
    pred = lines[0] if lines else ""
  return pred.strip(".。")


def intent_exact_match(prediction: str, item: dict) -> float:
  """1.0 iff the intent and the set of (slot, value) pairs both equal the reference's.

  List values compare as sorted tuples of strings; spaces are removed from predicted values only (ESFT's
  asymmetry, kept because the released scores depend on it). A prediction that is not JSON, not an object,
  or has non-object slots or values other than strings and lists scores 0 (ESFT scores 0 or raises).
  """
  reference_text = references(item)[0]
  try:
    reference = json.loads(reference_text)
  except json.JSONDecodeError as err:
    raise ValueError(f"intent reference is not JSON ({err.msg}): {reference_text!r}") from None
  if not isinstance(reference, dict) or not isinstance(reference.get("slots", {}), dict):
    raise ValueError(f"intent reference must be an object with an object 'slots': {reference_text!r}")
  reference_pairs = set()
  for name, value in reference.get("slots", {}).items():
    if isinstance(value, dict):
      raise ValueError(f"intent reference slot {name!r} holds an object, which cannot be compared: "
                       f"{reference_text!r}")
    reference_pairs.add((name, tuple(sorted(str(v) for v in value)) if isinstance(value, list) else value))

  try:
    predicted = json.loads(intent_prediction_text(prediction))
  except json.JSONDecodeError:
    return 0.0
  if not isinstance(predicted, dict) or not isinstance(predicted.get("slots", {}), dict):
    return 0.0
  predicted_pairs = set()
  for name, value in predicted.get("slots", {}).items():
    if isinstance(value, list):
      predicted_pairs.add((name, tuple(sorted(str(v).replace(" ", "") for v in value))))
    elif isinstance(value, str):
      predicted_pairs.add((name, value.replace(" ", "")))
    else:
      return 0.0
  same_intent = predicted.get("intent", "") == reference.get("intent", "")
  return float(same_intent and predicted_pairs == reference_pairs)


# --- math: GSM8K / MATH final answers ---------------------------------------------------------------------

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASHES = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS = re.compile(r"\b(?:the )?(?:final )?answer is[ \t]*:?[ \t]*([^\n]*)", re.IGNORECASE)
_NUMBER = re.compile(r"(?<!\d)-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|(?<!\d)-?\.\d+")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_LATEX_FRACTION = re.compile(r"(-?)\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}")
_PLAIN_FRACTION = re.compile(r"(-?\d+(?:\.\d+)?)/(-?\d+(?:\.\d+)?)")
_DECIMAL = re.compile(r"-?(?:\d+\.?\d*|\.\d+)")
_SPACED_DIGITS = re.compile(r"\d\s+[\d\\]")  # "1 3/4", "1 \frac{3}{4}": mixed numbers, not 13/4
_MATH_NOISE = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\$", "$", "\\%", "%", "^{\\circ}", "^\\circ", " ")
# Numeric answers match within this relative tolerance: 0.33333 is 1/3, 0.333 is not; 1234.5 is not 1234.7.
MATH_REL_TOL = 1e-4


def _first_boxed(text: str) -> str | None:
  """The contents of the first \\boxed{...}, braces balanced; None if absent or cut off."""
  match = _BOXED.search(text)
  if match is None:
    return None
  depth = 1
  for end in range(match.end(), len(text)):
    if text[end] == "{":
      depth += 1
    elif text[end] == "}":
      depth -= 1
      if depth == 0:
        return text[match.end():end]
  return None


def extract_math_answer(text: str) -> str | None:
  """The final answer a solution states: the first \\boxed{...}, else the first "#### X", else the first
  "The answer is X", else the last number; None if there is none.

  The first, not the last, explicit answer: few-shot generations run on into new questions with answers.
  """
  boxed = _first_boxed(text)
  if boxed is not None:
    return boxed.strip()
  for marker in (_HASHES, _ANSWER_IS):
    match = marker.search(text)
    if match and match.group(1).strip():
      return match.group(1).strip().rstrip(".").strip()
  numbers = _NUMBER.findall(text)
  return numbers[-1] if numbers else None


def _normalize_math(answer: str) -> str:
  """Drops the notation that does not change a final answer: $ and % signs, spacing, \\left/\\right,
  \\text{} wrappers, degree marks, \\dfrac/\\tfrac spelling and a trailing period."""
  text = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", answer)
  text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
  for noise in _MATH_NOISE:
    text = text.replace(noise, "")
  return text.rstrip(".")


def _as_number(answer: str) -> float | None:
  """The value of an answer that is a number, a/b or \\frac{a}{b}; None otherwise."""
  if _SPACED_DIGITS.search(answer):
    return None
  text = _THOUSANDS_COMMA.sub("", _normalize_math(answer))
  fraction = _LATEX_FRACTION.fullmatch(text)
  if fraction:
    sign, numerator, denominator = fraction.group(1), float(fraction.group(2)), float(fraction.group(3))
    return None if denominator == 0 else (-1 if sign else 1) * numerator / denominator
  fraction = _PLAIN_FRACTION.fullmatch(text)
  if fraction:
    numerator, denominator = float(fraction.group(1)), float(fraction.group(2))
    return None if denominator == 0 else numerator / denominator
  return float(text) if _DECIMAL.fullmatch(text) else None


def math_answers_equal(predicted: str, reference: str) -> bool:
  """Equal as normalised strings, or as numbers within MATH_REL_TOL. A predicted answer with words around
  its number ("18 dollars", "x = 5") is compared by its first number when the reference is numeric."""
  if _normalize_math(predicted) == _normalize_math(reference):
    return True
  reference_value = _as_number(reference)
  if reference_value is None:
    return False
  predicted_value = _as_number(predicted)
  if predicted_value is None:
    numbers = _NUMBER.findall(predicted)
    predicted_value = _as_number(numbers[0]) if numbers else None
  return predicted_value is not None and math.isclose(predicted_value, reference_value, rel_tol=MATH_REL_TOL,
                                                      abs_tol=1e-9)


def math_accuracy(prediction: str, item: dict) -> float:
  """1.0 iff the generation's final answer equals one of the references. A reference may be a bare answer
  ("18", "\\frac{3}{4}") or a whole solution (GSM8K's "... #### 18", MATH's "... \\boxed{18}")."""
  wanted = references(item)
  predicted = extract_math_answer(prediction)
  if predicted is None:
    return 0.0
  for reference in wanted:
    if "####" in reference or _BOXED.search(reference):
      reference = extract_math_answer(reference) or reference
    if math_answers_equal(predicted, reference):
      return 1.0
  return 0.0


# --- code: pass@1 -----------------------------------------------------------------------------------------

_PYTHON_FENCE = re.compile(r"```(?:python3?|py)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
_ANY_FENCE = re.compile(r"```[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
# Prepended to every program: socket creation raises, so tests cannot reach the network by accident. A
# subclass (not a function) keeps modules that subclass socket.socket at import time (ssl) importable.
_NETWORK_GUARD = """\
import socket as _guard_socket, _socket as _guard_c_socket
class _NoNetworkSocket(_guard_socket.socket):
  def __init__(self, *args, **kwargs):
    raise PermissionError("network access is disabled while evaluating generated code")
_guard_socket.socket = _guard_c_socket.socket = _NoNetworkSocket
del _guard_socket, _guard_c_socket, _NoNetworkSocket
"""
CODE_TIMEOUT_S = 5.0


def extract_code(text: str) -> str:
  """The first ```python block (a generation cut off inside it counts), else the first ``` block of any
  language, else the whole text unchanged (completion-style generations continue a function body)."""
  for fence in (_PYTHON_FENCE, _ANY_FENCE):
    match = fence.search(text)
    if match:
      return match.group(1)
  return text


def run_python(program: str, timeout_s: float = CODE_TIMEOUT_S) -> bool:
  """True iff `program` exits with status 0 within `timeout_s` seconds.

  It runs in a fresh isolated interpreter (`python -I`: no PYTHON* variables, no user site), in a scratch
  directory that is its cwd, HOME and TMPDIR, with a minimal environment, no stdin and socket creation
  blocked. On timeout its whole process group is killed. This guards against accidents, not attacks: run
  untrusted generations inside a container. POSIX only.
  """
  with tempfile.TemporaryDirectory(prefix="esft_code_", ignore_cleanup_errors=True) as scratch:
    path = Path(scratch) / "program.py"
    path.write_text(_NETWORK_GUARD + program, encoding="utf-8")
    env = {"PATH": os.defpath, "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8"}
    process = subprocess.Popen([sys.executable, "-I", str(path)], cwd=scratch, env=env,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
      return process.wait(timeout=timeout_s) == 0
    except subprocess.TimeoutExpired:
      # The leader is not reaped yet, so its group id cannot have been reused.
      os.killpg(process.pid, signal.SIGKILL)
      process.wait()
      return False


def code_pass_at_1(prediction: str, item: dict) -> float:
  """1.0 iff the extracted code followed by the item's tests runs to exit status 0 (see `run_python`).

  Item fields: "tests" (a string of asserts, or a list of them; HumanEval's `check` function must be
  followed by its call, e.g. "check(add)"), optional "code_prefix" (put before the code: HumanEval's prompt
  when the model continues a function body) and optional "timeout_s" (default CODE_TIMEOUT_S).
  """
  tests = item.get("tests")
  if isinstance(tests, list) and all(isinstance(t, str) for t in tests):
    tests = "\n".join(tests)
  if not isinstance(tests, str) or not tests.strip():
    raise ValueError(f"code item needs 'tests' (a string of asserts or a list of them), got {tests!r}")
  program = f"{item.get('code_prefix', '')}{extract_code(prediction)}\n\n{tests}\n"
  return float(run_python(program, float(item.get("timeout_s", CODE_TIMEOUT_S))))


# --- text overlap: chrF and ROUGE-L ------------------------------------------------------------------------


def chrf(hypothesis: str, reference: str, char_order: int = 6, beta: float = 2.0) -> float:
  """Sentence chrF in [0, 1], as sacrebleu's CHRF defaults define it (chrF2, no word n-grams, whitespace
  removed, case-sensitive, effective-order averaging rather than epsilon smoothing): character n-gram
  precision and recall are averaged over the orders 1..char_order that both strings have, then F-beta."""
  hyp, ref = "".join(hypothesis.split()), "".join(reference.split())
  precisions, recalls = [], []
  for n in range(1, char_order + 1):
    hyp_ngrams = collections.Counter(hyp[i:i + n] for i in range(len(hyp) - n + 1))
    ref_ngrams = collections.Counter(ref[i:i + n] for i in range(len(ref) - n + 1))
    if hyp_ngrams and ref_ngrams:
      matches = sum((hyp_ngrams & ref_ngrams).values())
      precisions.append(matches / sum(hyp_ngrams.values()))
      recalls.append(matches / sum(ref_ngrams.values()))
  if not precisions:
    return 0.0
  precision, recall = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
  factor = beta**2
  return (1 + factor) * precision * recall / (factor * precision + recall) if precision + recall else 0.0


_CJK = "\u2e80-\u2fff\u3000-\u303f\u3040-\u30ff\u3100-\u312f\u31a0-\u31ff\u3400-\u4dbf\u4e00-\u9fff" \
       "\uf900-\ufaff\ufe30-\ufe4f\uff00-\uffef"
_ROUGE_TOKEN = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")


def rouge_tokens(text: str) -> list[str]:
  """Lowercased whitespace tokens, with every CJK character its own token.

  The summary and law tasks are Chinese, which has no spaces: whitespace alone would make each sentence one
  token, and rouge-score's default tokenizer (ASCII letters and digits only) would drop the text entirely.
  """
  return _ROUGE_TOKEN.findall(text.lower())


def lcs_length(a: Sequence[Any], b: Sequence[Any]) -> int:
  """Length of the longest common subsequence, bit-parallel (Hyyrö 2004): one big-integer update per
  element of `b` instead of len(a) table cells, which keeps long law judgments fast in pure Python."""
  match_masks: dict[Any, int] = {}
  for i, token in enumerate(a):
    match_masks[token] = match_masks.get(token, 0) | (1 << i)
  all_ones = (1 << len(a)) - 1
  row = all_ones  # zero bits mark positions of `a` that end a longer common subsequence
  for token in b:
    matched = row & match_masks.get(token, 0)
    row = ((row + matched) | (row - matched)) & all_ones
  return len(a) - bin(row).count("1")


def rouge_l(prediction: str, reference: str) -> float:
  """ROUGE-L F1 as rouge-score computes it (LCS over tokens; precision over the prediction's length, recall
  over the reference's, F with beta 1), on `rouge_tokens` instead of rouge-score's ASCII-only tokenizer."""
  predicted, wanted = rouge_tokens(prediction), rouge_tokens(reference)
  common = lcs_length(wanted, predicted) if predicted and wanted else 0
  if common == 0:
    return 0.0
  precision, recall = common / len(predicted), common / len(wanted)
  return 2 * precision * recall / (precision + recall)


def first_paragraph(text: str) -> str:
  """The text before the first blank line: ESFT's translation evaluator cuts predictions there, because
  few-shot generations go on to invent the next shot."""
  return text.strip().split("\n\n")[0]


def translation_chrf(prediction: str, item: dict) -> float:
  """chrF of the first paragraph of the prediction against the best-matching reference."""
  return max(chrf(first_paragraph(prediction), reference) for reference in references(item))


def rouge_l_f1(prediction: str, item: dict) -> float:
  """ROUGE-L F1 against the best-matching reference; like ESFT's summary and law evaluators, the whole
  (stripped) generation is scored."""
  return max(rouge_l(prediction.strip(), reference) for reference in references(item))


def exact_match(prediction: str, item: dict) -> float:
  """1.0 iff the prediction's first line, stripped, equals a reference exactly (short-answer benchmarks)."""
  first_line = prediction.strip().split("\n", 1)[0].strip()
  return float(any(first_line == reference.strip() for reference in references(item)))


METRICS: dict[str, Metric] = {
    "exact_match": exact_match,
    "intent": intent_exact_match,
    "math": math_accuracy,
    "code": code_pass_at_1,
    "translation": translation_chrf,
    "summary": rouge_l_f1,
    "law": rouge_l_f1,
}
NON_GENERATIVE = ("loss", "choice")  # `esft-jax eval` metrics scored without generating (see evaluate.runner)


# --- multiple choice ---------------------------------------------------------------------------------------


def multiple_choice_accuracy(choice_logliks: Sequence[float], answer_index: int,
                             lengths: Sequence[float] | None = None) -> float:
  """1.0 iff the choice with the highest summed log-likelihood is `answer_index` (MMLU/ARC/HellaSwag).

  With `lengths` (each choice's continuation length; lm-evaluation-harness's acc_norm uses bytes) the
  log-likelihoods are divided by them first. Ties go to the lowest index, as with numpy's argmax.
  """
  scores = np.asarray(choice_logliks, dtype=np.float64)
  if scores.ndim != 1 or scores.size == 0:
    raise ValueError(f"choice_logliks must be a non-empty list of floats, got shape {scores.shape}")
  if not 0 <= answer_index < scores.size:
    raise ValueError(f"answer_index {answer_index} is out of range for {scores.size} choices")
  if lengths is not None:
    lengths_arr = np.asarray(lengths, dtype=np.float64)
    if lengths_arr.shape != scores.shape or np.any(lengths_arr <= 0):
      raise ValueError(f"lengths must be {scores.size} positive numbers, one per choice, got {lengths!r}")
    scores = scores / lengths_arr
  return float(int(np.argmax(scores)) == answer_index)


# --- completions files ----------------------------------------------------------------------------------


def _completion_record(record: Any) -> tuple[str, dict]:
  """(prediction, item) of one parsed completions line, in ESFT's format or ours."""
  if isinstance(record, dict) and isinstance(record.get("example"), dict):
    item = record["example"]
    prediction = item.get("raw_prediction")
    if not isinstance(prediction, str):
      raise ValueError(f"ESFT-format line needs a string example.raw_prediction, got {prediction!r}")
    return prediction, item
  if isinstance(record, dict) and "prediction" in record:
    if not isinstance(record["prediction"], str):
      raise ValueError(f"'prediction' must be a string, got {record['prediction']!r}")
    return record["prediction"], {k: v for k, v in record.items() if k != "prediction"}
  found = sorted(record) if isinstance(record, dict) else type(record).__name__
  raise ValueError(f"expected ESFT's {{\"example\": {{\"raw_prediction\", \"raw_answers\", ...}}, \"score\"}} or "
                   f"a flat {{\"prediction\", <item fields>}} object, found {found}")


def score_completions(path: str | os.PathLike, metric: str | Metric) -> tuple[float, list[float]]:
  """Re-scores saved completions; returns (mean, per-completion scores in file order).

  The file is a results JSON of `esft-jax eval --out` (its "items"), or JSONL with one object per non-blank line,
  in either format:
    ESFT's:  {"example": {"prompt", "raw_prediction", "raw_answers"}, "score"}  (the stored score is ignored)
    ours:    {"prediction": "<generated text>", <the eval item's fields: "answers", "tests", ...>}
  `metric` is a METRICS name or any `score(prediction, item)` function, e.g. a functools.partial of
  `llm_judge`. Malformed lines and items raise ValueError naming the file and line (or item).
  """
  if isinstance(metric, str):
    if metric not in METRICS:
      raise ValueError(f"unknown metric {metric!r}; choose one of {sorted(METRICS)} or pass a function")
    metric = METRICS[metric]
  scores = []
  for where, record in _completion_records(path):
    try:
      prediction, item = _completion_record(record)
      scores.append(float(metric(prediction, item)))
    except ValueError as err:
      raise ValueError(f"{where}: {err}") from err
  if not scores:
    raise ValueError(f"{path}: no completions found; expected one JSON object a line, or the results JSON of "
                     "`esft-jax eval --out`")
  return sum(scores) / len(scores), scores


def _completion_records(path: str | os.PathLike) -> list[tuple[str, Any]]:
  """(where, parsed record) of each completion in a results JSON of `esft-jax eval --out` or a JSONL file."""
  text = Path(path).read_text(encoding="utf-8")
  try:
    whole = json.loads(text)
  except json.JSONDecodeError:
    whole = None
  if isinstance(whole, dict) and isinstance(whole.get("items"), list):
    return [(f"{path}: items[{i}]", record) for i, record in enumerate(whole["items"])]
  records = []
  for line_number, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    try:
      records.append((f"{path}:{line_number}", json.loads(line)))
    except json.JSONDecodeError as err:
      raise ValueError(f"{path}:{line_number}: not valid JSON ({err.msg}, column {err.colno}); each line must "
                       f"be one completion object") from None
  return records


# --- optional LLM judge ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class JudgeRubric:
  """ESFT's judge shape: a prompt with {prediction} and {ground_truth} slots that asks a judge model for a
  total out of 10, and a regex whose first group, on its first match, is that total."""
  template: str
  score_pattern: str
  first_paragraph_only: bool = False  # ESFT's translation evaluator judges only the first paragraph


# ESFT's system prompt and score patterns. The templates below are our wording of ESFT's criteria; for the
# official prompts, build a JudgeRubric from the templates in deepseek-ai/ESFT's benchmarks.py.
JUDGE_SYSTEM_PROMPT = "You are a helpful assistant. Follow the user's instructions carefully. Respond using markdown."
_CHINESE_TOTAL = r"总分是：(\d+\.\d+|\d+)分"
JUDGE_RUBRICS: dict[str, JudgeRubric] = {
    "summary": JudgeRubric(
        template=(
            "请给下面的电话总结打分，满分10分，按以下各项逐项扣分，总分为10分减去各项扣分之和，最低0分。\n"
            "1. 内容准确性：是否准确反映客户问题或投诉的要点，有无错误陈述或误解。\n"
            "2. 详细程度/完整性：是否覆盖参考答案中的所有要点，遗漏关键信息要扣分。\n"
            "3. 内容冗余度：是否简洁，与参考答案风格一致，过长或风格不符要扣分。\n"
            "4. 行动指令正确性：后续处理的建议或请求是否与参考答案一致。\n"
            "请以“内容准确性扣x分，详细程度/完整性扣x分，内容冗余度扣x分，行动指令正确性扣x分，总分是：x分”开头回答，"
            "再说明理由。\n\n预测答案：{prediction}\n参考答案：{ground_truth}\n"),
        score_pattern=_CHINESE_TOTAL),
    "law": JudgeRubric(
        template=(
            "请给下面的案件判决预测打分，满分10分，按以下各项逐项扣分，总分为10分减去各项扣分之和，最低0分。\n"
            "1. 相关性（最重要）：预测的判决与参考答案一致的程度；完全一致或等效表述给高分，没有判决内容扣10分。\n"
            "2. 完整性：是否涵盖当事人、金额、责任认定、费用承担等参考答案中的要点。\n"
            "3. 准确性：细节、数字、日期和法律依据是否与参考答案一致，严重错误多扣分。\n"
            "4. 客观性与专业性：是否客观并使用恰当的法律术语。\n"
            "请以“相关性扣x分，完整性扣x分，准确性扣x分，客观性与专业性扣x分，总分是：x分”开头回答，再说明理由。\n\n"
            "预测答案：{prediction}\n参考答案：{ground_truth}\n"),
        score_pattern=_CHINESE_TOTAL),
    "translation": JudgeRubric(
        template=(
            "As an expert in machine translation, score the predicted translation against the reference out of 10 "
            "points on each criterion: content accuracy (does it convey the reference's key points), "
            "completeness (does it cover every important point), and redundancy (is it concise and in the "
            "reference's style). The total score is the average of the criteria. Answer only in the format "
            "\"Content accuracy x points, completeness x points, redundancy x points, total score: x points\", "
            "without reasons.\n\nPredicted answer: {prediction}\n\nReference answer: {ground_truth}\n"),
        score_pattern=r"score: *?(\d+\.\d+|\d+) *?point",
        first_paragraph_only=True),
}
# (url, request body, headers, timeout in seconds) -> response body
Transport = Callable[[str, bytes, dict[str, str], float], bytes]


def _urllib_post(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> bytes:
  request = urllib.request.Request(url, data=body, headers=headers, method="POST")
  with urllib.request.urlopen(request, timeout=timeout_s) as response:
    return response.read()


def _rubric(rubric: JudgeRubric | str) -> JudgeRubric:
  if isinstance(rubric, JudgeRubric):
    return rubric
  if rubric not in JUDGE_RUBRICS:
    raise ValueError(f"unknown judge rubric {rubric!r}; choose one of {sorted(JUDGE_RUBRICS)} or pass a JudgeRubric")
  return JUDGE_RUBRICS[rubric]


def judge_prompt(prediction: str, item: dict, rubric: JudgeRubric | str) -> str:
  """The judge's user message: ESFT strips the prediction (and keeps its first paragraph for translation),
  writes "None" for an empty one, and compares it with the first reference."""
  rubric = _rubric(rubric)
  text = first_paragraph(prediction) if rubric.first_paragraph_only else prediction.strip()
  return rubric.template.format(prediction=text or "None", ground_truth=references(item)[0])


def parse_judge_score(response_text: str, rubric: JudgeRubric | str) -> float:
  """The first total the rubric's pattern finds, divided by 10 and clipped to [0, 1]; 0 when there is none,
  as in ESFT."""
  match = re.search(_rubric(rubric).score_pattern, response_text)
  return min(max(float(match.group(1)) / 10, 0.0), 1.0) if match else 0.0


def llm_judge(prediction: str, item: dict, endpoint: str, rubric: JudgeRubric | str, *,
              model: str = "gpt-4-1106-preview", api_key: str | None = None, max_tokens: int = 80,
              retries: int = 5, retry_sleep_s: float = 10.0, timeout_s: float = 60.0,
              transport: Transport | None = None) -> float:
  """Score in [0, 1] from a judge model behind an OpenAI-compatible chat endpoint (ESFT's evaluation of
  summary, law and translation). Never used unless called; bind it with functools.partial to pass it to
  `score_completions`.

  `endpoint` is the API base (".../v1"); the request goes to {endpoint}/chat/completions with `api_key`, if
  any, as a Bearer token. ESFT's settings are the defaults: its judge model name, 80 tokens, 5 tries 10 s
  apart. Unlike ESFT, which scores 0 when every try fails, this raises: an outage is not a score.
  """
  if retries < 1:
    raise ValueError(f"retries must be at least 1, got {retries}")
  url = endpoint.rstrip("/") + "/chat/completions"
  body = json.dumps({
      "model": model,
      "messages": [{"role": "system", "content": JUDGE_SYSTEM_PROMPT},
                   {"role": "user", "content": judge_prompt(prediction, item, rubric)}],
      "max_tokens": max_tokens,
  }).encode("utf-8")
  headers = {"Content-Type": "application/json"}
  if api_key:
    headers["Authorization"] = f"Bearer {api_key}"
  send = transport or _urllib_post
  for attempt in range(1, retries + 1):
    try:
      raw = send(url, body, headers, timeout_s)
      break
    except OSError as err:
      if attempt == retries:
        raise RuntimeError(f"judge endpoint {url} failed {retries} times, last with {err!r}; check the "
                           f"endpoint, model name and key, or score with a reference-based metric") from err
      time.sleep(retry_sleep_s)
  try:
    content = json.loads(raw)["choices"][0]["message"]["content"]
  except (json.JSONDecodeError, KeyError, IndexError, TypeError) as err:
    raise ValueError(f"judge endpoint {url} returned no chat completion ({err!r}): {raw[:200]!r}") from None
  return parse_judge_score(content or "", rubric)
