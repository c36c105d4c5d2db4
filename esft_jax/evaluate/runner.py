"""Running a model on the paper's evaluations: generation scored by a task metric, held-out loss, and
multiple-choice log-likelihood (MMLU/ARC/HellaSwag style).

Generation follows ESFT's evaluator: the prompt (already formatted, few-shot) is encoded with BOS in front,
decoded greedily, and the metric reads the completion; translation is cut at the first blank line.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from esft_jax.config import ModelConfig
from esft_jax.data.formatting import Example, format_conversation
from esft_jax.data.jsonl import Conversation, EvalItem
from esft_jax.data.sources import open_examples
from esft_jax.esft.routing_pass import padded_batches
from esft_jax.evaluate.metrics import METRICS, NON_GENERATIVE, multiple_choice_accuracy
from esft_jax.generate import SamplingConfig, generate
from esft_jax.interop.tokenizer import Tokenizer
from esft_jax.model.transformer import Transformer
from esft_jax.train.loss import token_cross_entropy
from esft_jax.train.metrics import progress

STOP_STRINGS = {"translation": ("\n\n",)}


def prompt_ids(tokenizer: Tokenizer, text: str) -> list[int]:
  return ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(text)


def evaluate_generation(config: ModelConfig, params, tokenizer: Tokenizer, items: Sequence[EvalItem], metric: str,
                        max_new_tokens: int = 128, batch_size: int = 8, dtype=jnp.float32,
                        prompt_length: int | None = None, expert_impl: str = "auto") -> dict:
  if metric not in METRICS:
    raise ValueError(f"metric {metric!r} is unknown; use one of {sorted(METRICS) + list(NON_GENERATIVE)}")
  sampling = SamplingConfig(max_new_tokens=max_new_tokens, stop_strings=STOP_STRINGS.get(metric, ()))
  prompts = [prompt_ids(tokenizer, item.prompt) for item in items]
  outputs = generate(config, params, prompts, sampling, tokenizer.eos_id, tokenizer, batch_size, dtype=dtype,
                     expert_impl=expert_impl, prompt_length=prompt_length)
  records = []
  for item, output in zip(items, outputs):
    fields = item.metric_item()
    records.append({"example": {"prompt": item.prompt, "raw_prediction": output["text"],
                                "raw_answers": fields.get("raw_answers", fields.get("answers", []))},
                    "score": METRICS[metric](output["text"], fields), "source": item.source})
  return {"metric": metric, "mean": float(np.mean([r["score"] for r in records])) if records else 0.0,
          "items": records}


# Module-level jits with the (hashable) model static: repeated evaluations of one model shape compile once.
@partial(jax.jit, static_argnames="model")
def _summed_loss(model: Transformer, params, inputs, targets, mask, segments):
  logits = model.apply({"params": params}, inputs, segments).logits
  return jnp.sum(token_cross_entropy(logits, targets) * mask), jnp.sum(mask)


@partial(jax.jit, static_argnames="model")
def _per_row_loglik(model: Transformer, params, inputs, targets, mask, segments):
  logits = model.apply({"params": params}, inputs, segments).logits
  return -jnp.sum(token_cross_entropy(logits, targets) * mask, axis=-1)


def _rows(examples: Sequence[Example], batch_size: int):
  """Batches of unpacked rows: inputs, shifted targets, loss mask on targets, segment ids."""
  for chunk, inputs, segments in padded_batches(examples, batch_size):
    targets = np.zeros_like(inputs)
    targets[:, :-1] = inputs[:, 1:]  # past a row's end both are padding (0)
    mask = np.zeros(inputs.shape, np.float32)
    for i, e in enumerate(chunk):
      mask[i, :len(e) - 1] = e.loss_mask_L[1:]
    yield inputs, targets, mask, segments


def heldout_loss(config: ModelConfig, params, examples: Sequence[Example], batch_size: int = 8,
                 dtype=jnp.float32, expert_impl: str = "auto") -> dict:
  """Mean next-token loss over the loss-masked tokens (answers and EOS) of unpacked samples, and perplexity."""
  model = Transformer(config, expert_impl=expert_impl, dtype=dtype, max_segments=1)  # one sample first per row
  total, count = 0.0, 0.0
  for inputs, targets, mask, segments in _rows(list(examples), batch_size):
    loss_sum, n = _summed_loss(model, params, inputs, targets, mask, segments)
    total, count = total + float(loss_sum), count + float(n)
  mean = total / max(count, 1.0)
  return {"metric": "loss", "mean": mean, "perplexity": float(np.exp(mean)), "tokens": int(count)}


def _read_choice_items(path: Path) -> list[dict]:
  items = []
  for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
    if not line.strip():
      continue
    try:
      item = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
    choices, answer = item.get("choices"), item.get("answer")
    if not isinstance(item.get("question"), str) or not isinstance(choices, list) or not choices or \
        not isinstance(answer, int) or not 0 <= answer < len(choices):
      raise ValueError(f"{path}:{number}: multiple-choice records look like "
                       '{"question": "...", "choices": ["...", ...], "answer": <index>}')
    items.append(item)
  if not items:
    raise ValueError(f"{path}: the file has no records")
  return items


def multiple_choice(config: ModelConfig, params, tokenizer: Tokenizer, path: Path, batch_size: int = 8,
                    dtype=jnp.float32) -> dict:
  """Accuracy by summed log-likelihood of each choice (continuation " choice") after the question, plus the
  length-normalised accuracy (per byte, as lm-evaluation-harness's acc_norm)."""
  items = _read_choice_items(path)
  examples = []
  for item in items:
    context = prompt_ids(tokenizer, item["question"])
    for choice in item["choices"]:
      continuation = tokenizer.encode(" " + choice.strip())
      ids = np.asarray(context + continuation, np.int32)
      mask = np.zeros(len(ids), bool)
      mask[len(context):] = True
      examples.append(Example(ids, mask, item["question"][:40]))
  model = Transformer(config, dtype=dtype, max_segments=1)  # one sample first per row
  logliks: list[float] = []
  bar = progress(total=len(examples), desc="choices")
  for inputs, targets, mask, segments in _rows(examples, batch_size):
    logliks.extend(np.asarray(_per_row_loglik(model, params, inputs, targets, mask, segments)).tolist())
    bar.update(len(inputs))
  bar.close()
  records, pos = [], 0
  for item in items:
    n = len(item["choices"])
    ll = logliks[pos:pos + n]
    pos += n
    lengths = [len((" " + c.strip()).encode()) for c in item["choices"]]
    records.append({"question": item["question"], "logliks": ll, "answer": item["answer"],
                    "score": multiple_choice_accuracy(ll, item["answer"]),
                    "score_norm": multiple_choice_accuracy(ll, item["answer"], lengths)})
  return {"metric": "choice", "mean": float(np.mean([r["score"] for r in records])),
          "mean_norm": float(np.mean([r["score_norm"] for r in records])), "items": records}


def run_evaluation(config: ModelConfig, params, tokenizer: Tokenizer, data: str | Path, metric: str,
                   max_new_tokens: int = 128, batch_size: int = 8, dtype=jnp.float32,
                   data_dir: str | Path | None = None) -> dict:
  """The `esft-jax eval --model` dispatcher: "loss" reads training-format records, "choice" multiple-choice
  JSONL, every other metric ESFT's evaluation format; JSONL or tfds:NAME[/CONFIG]:SPLIT except for "choice"."""
  if metric == "choice":
    return multiple_choice(config, params, tokenizer, Path(data), batch_size, dtype)
  source = open_examples(data, data_dir)
  records = [source[i] for i in range(len(source))]
  if metric == "loss":
    if not isinstance(records[0], Conversation):
      raise ValueError(f"{data}: the loss metric reads training-format records ({{\"messages\": [...]}})")
    return heldout_loss(config, params, [format_conversation(r, tokenizer) for r in records], batch_size, dtype)
  if not isinstance(records[0], EvalItem):
    raise ValueError(f"{data}: metric {metric!r} reads evaluation records ({{\"prompt\", \"answers\"}})")
  return evaluate_generation(config, params, tokenizer, records, metric, max_new_tokens, batch_size, dtype)
