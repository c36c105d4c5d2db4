"""The scores of the paper's evaluations, one pure `score(prediction, item) -> float` in [0, 1] per task.

`prediction` is the raw generated text; `item` is the eval item it answers. References are read from
"raw_answers" (ESFT's eval files; its evaluators score against raw_answers[0]), else "answers" (a list),
else "answer". Code items carry their tests in "tests". METRICS maps task names to these functions and
`score_completions` re-scores a saved completions file with any of them.

ESFT's own evaluators (deepseek-ai/ESFT, benchmarks.py) exist only for intent (exact match, reproduced here
exactly) and for summary, law and translation, which it scores with a GPT-4 judge. The judge is available as
the opt-in `esft_jax.evaluate.judge.llm_judge`; the registered defaults for those tasks are the reference-based
chrF and ROUGE-L, which need no network. Math, code and multiple choice are not in the release; they follow
GSM8K/MATH, HumanEval/MBPP and lm-evaluation-harness conventions. Code runs in `esft_jax.evaluate.sandbox`.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from esft_jax.evaluate.sandbox import CODE_TIMEOUT_S, run_python

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
# The longest run a code item may ask for with "timeout_s": eval data cannot hold the evaluation up longer.
MAX_CODE_TIMEOUT_S = 30.0


def extract_code(text: str) -> str:
  """The first ```python block (a generation cut off inside it counts), else the first ``` block of any
  language, else the whole text unchanged (completion-style generations continue a function body)."""
  for fence in (_PYTHON_FENCE, _ANY_FENCE):
    match = fence.search(text)
    if match:
      return match.group(1)
  return text


def code_pass_at_1(prediction: str, item: dict) -> float:
  """1.0 iff the extracted code followed by the item's tests runs to exit status 0 in the sandbox of
  `esft_jax.evaluate.sandbox`.

  Item fields: "tests" (a string of asserts, or a list of them; HumanEval's `check` function must be
  followed by its call, e.g. "check(add)"), optional "code_prefix" (put before the code: HumanEval's prompt
  when the model continues a function body) and optional "timeout_s" (default CODE_TIMEOUT_S, at most
  MAX_CODE_TIMEOUT_S).
  """
  tests = item.get("tests")
  if isinstance(tests, list) and all(isinstance(t, str) for t in tests):
    tests = "\n".join(tests)
  if not isinstance(tests, str) or not tests.strip():
    raise ValueError(f"code item needs 'tests' (a string of asserts or a list of them), got {tests!r}")
  code = extract_code(prediction)
  if "code_prefix" not in item:
    # A whole program: its first line starts at column 0. A chat model's answer follows "Assistant:" after one
    # space (the chat format's), which would otherwise be an IndentationError.
    code = code.lstrip(" \t")
  program = f"{item.get('code_prefix', '')}{code}\n\n{tests}\n"
  timeout_s = item.get("timeout_s", CODE_TIMEOUT_S)
  if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
    raise ValueError(f"code item 'timeout_s' must be a positive number of seconds, got {timeout_s!r}")
  return float(run_python(program, min(float(timeout_s), MAX_CODE_TIMEOUT_S)))


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


METRICS: dict[str, Metric] = {
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
  `esft_jax.evaluate.judge.llm_judge`. Malformed lines and items raise ValueError naming the file and line (or item).
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
