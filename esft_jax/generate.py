"""Batched decoding with a KV cache: greedy or sampled (temperature, top-p), EOS and stop strings.

Prompts are left-padded into a fixed batch size and a bucketed prompt length, and decoding runs in jitted
chunks of steps between host checks, so an evaluation compiles a handful of shapes however many prompts it
has, and stops early once every row has hit EOS or a stop string.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from esft_jax.config import ModelConfig
from esft_jax.interop.tokenizer import Tokenizer
from esft_jax.model.transformer import Cache, Transformer, init_cache
from esft_jax.train.metrics import progress


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  max_new_tokens: int = 128
  temperature: float = 0.0  # 0 means greedy
  top_p: float = 1.0
  stop_strings: tuple[str, ...] = ()  # the text is cut at the first one (ESFT cuts translations at "\n\n")
  chunk: int = 16  # decoding steps per jitted call between host checks


def bucket(n: int, minimum: int = 16) -> int:
  return max(minimum, 1 << (n - 1).bit_length())


def sample_next(logits_BxV: jax.Array, rng: jax.Array, temperature: float, top_p: float) -> jax.Array:
  """The next token per row: argmax at temperature 0, else nucleus sampling (the smallest set of tokens whose
  probability reaches top_p, the crossing token included)."""
  if temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits = logits_BxV / temperature
  if top_p < 1.0:
    sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted token
    kept = jnp.sum(before < top_p, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(sorted_desc, kept - 1, axis=-1)
    logits = jnp.where(logits >= threshold, logits, -jnp.inf)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("model", "temperature", "top_p"))
def _prefill(model: Transformer, params, cache: Cache, tokens_BxP, segments_BxP, positions_BxP, rng,
             temperature: float, top_p: float):
  out = model.apply({"params": params}, tokens_BxP, segments_BxP, positions_BxP, cache=cache)
  return sample_next(out.logits[:, -1], rng, temperature, top_p), out.cache


@partial(jax.jit, static_argnames=("model", "steps", "temperature", "top_p"))
def _decode_chunk(model: Transformer, params, cache: Cache, token_B, position_B, rng, steps: int,
                  temperature: float, top_p: float):
  def step(carry, key):
    cache, token, position = carry
    out = model.apply({"params": params}, token[:, None], jnp.ones_like(token)[:, None], position[:, None],
                      cache=cache)
    nxt = sample_next(out.logits[:, -1], key, temperature, top_p)
    return (out.cache, nxt, position + 1), nxt

  (cache, token, position), tokens = jax.lax.scan(step, (cache, token_B, position_B), jax.random.split(rng, steps))
  return tokens.T, cache, token, position


def _cut(ids: list[int], eos_id: int | None) -> tuple[list[int], bool]:
  if eos_id is not None and eos_id in ids:
    return ids[:ids.index(eos_id)], True
  return ids, False


def _stop_text(text: str, stops: Sequence[str]) -> tuple[str, bool]:
  cuts = [text.index(s) for s in stops if s in text]
  return (text[:min(cuts)], True) if cuts else (text, False)


def generate(config: ModelConfig, params, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
             eos_id: int | None, tokenizer: Tokenizer | None = None, batch_size: int = 8, seed: int = 0,
             dtype=jnp.float32, expert_impl: str = "auto", prompt_length: int | None = None) -> list[dict]:
  """Per prompt: {"ids": new token ids (cut before EOS), "text": decoded and cut at the first stop string}
  (text only with a tokenizer). Stop strings need the tokenizer. `prompt_length` pads every batch's prompts to
  that many tokens instead of each batch's own bucket: calls on prompts of different lengths then share one
  compiled prefill and decoding step (each new length compiles both, which on a GPU takes longer than decoding)."""
  if sampling.stop_strings and tokenizer is None:
    raise ValueError("stop strings need a tokenizer to decode the generated text")
  model = Transformer(config, expert_impl=expert_impl, dtype=dtype)
  rng = jax.random.key(seed)
  results: list[dict] = []
  bar = progress(total=len(prompts), desc="generate")
  for start in range(0, len(prompts), batch_size):
    chunk_prompts = [list(p) for p in prompts[start:start + batch_size]]
    if any(not p for p in chunk_prompts):
      raise ValueError(f"prompt {start + [len(p) for p in chunk_prompts].index(0)} is empty")
    longest = max(len(p) for p in chunk_prompts)
    if prompt_length is not None and longest > prompt_length:
      raise ValueError(f"a prompt of {longest} tokens is longer than prompt_length={prompt_length}")
    p_len = prompt_length or bucket(longest)
    tokens = np.zeros((batch_size, p_len), np.int32)
    segments = np.zeros_like(tokens)
    for i, prompt in enumerate(chunk_prompts):  # left padding: every row's last prompt token is at p_len - 1
      tokens[i, p_len - len(prompt):] = prompt
      segments[i, p_len - len(prompt):] = 1
    segments[len(chunk_prompts):, -1] = 1  # filler rows decode one dummy token so no row is fully masked
    positions = np.maximum(np.cumsum(segments, axis=1) - 1, 0).astype(np.int32)
    steps = sampling.chunk
    slots = p_len + -(-sampling.max_new_tokens // steps) * steps
    cache = init_cache(config, batch_size, slots, dtype)
    rng, key = jax.random.split(rng)
    token, cache = _prefill(model, params, cache, jnp.asarray(tokens), jnp.asarray(segments),
                            jnp.asarray(positions), key, sampling.temperature, sampling.top_p)
    position = jnp.asarray(positions[:, -1] + 1)
    generated = np.asarray(token)[:, None]
    while generated.shape[1] < sampling.max_new_tokens and not _all_done(generated, chunk_prompts, eos_id,
                                                                           sampling, tokenizer):
      rng, key = jax.random.split(rng)
      new, cache, token, position = _decode_chunk(model, params, cache, token, position, key, steps,
                                                  sampling.temperature, sampling.top_p)
      generated = np.concatenate([generated, np.asarray(new)], axis=1)
    for i in range(len(chunk_prompts)):
      ids, _ = _cut(generated[i, :sampling.max_new_tokens].tolist(), eos_id)
      result = {"ids": ids}
      if tokenizer is not None:
        result["text"] = _stop_text(tokenizer.decode(ids), sampling.stop_strings)[0]
      results.append(result)
    bar.update(len(chunk_prompts))
  bar.close()
  return results


def _all_done(generated: np.ndarray, prompts, eos_id, sampling: SamplingConfig, tokenizer) -> bool:
  for i in range(len(prompts)):
    ids, ended = _cut(generated[i].tolist(), eos_id)
    if not ended and not (sampling.stop_strings and _stop_text(tokenizer.decode(ids), sampling.stop_strings)[1]):
      return False
  return True
