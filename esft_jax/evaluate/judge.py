"""The optional LLM judge: ESFT's GPT-4 evaluation of summary, law and translation, against any
OpenAI-compatible chat endpoint. Nothing calls it unless asked (bind `llm_judge` with functools.partial and pass
it to `esft_jax.evaluate.metrics.score_completions`); the tests drive it through a fake transport.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
import urllib.request
from typing import Callable

from esft_jax.evaluate.metrics import first_paragraph, references


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
