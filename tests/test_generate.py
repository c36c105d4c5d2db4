"""Decoding against transformers' generate, the cache against the full forward pass, and sampling rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from esft_jax.generate import SamplingConfig, generate, sample_next
from esft_jax.interop.hf import load_hf_model
from esft_jax.model.transformer import Transformer, init_cache
from tests.hf_models import VOCAB, save_hf_model_dir

PROMPTS = [[5, 17, 33, 8, 41, 9, 60], [12, 7], [88, 3, 51, 19, 23]]


@pytest.mark.parametrize("name", ["deepseek_v2", "deepseek_v3", "qwen3_moe", "mixtral", "qwen2_moe", "olmoe"])
def test_greedy_matches_transformers_generate(tmp_path, name):
  hf_model = save_hf_model_dir(name, tmp_path)
  loaded = load_hf_model(tmp_path)
  new = 12
  width = max(map(len, PROMPTS))
  ids = torch.zeros((len(PROMPTS), width), dtype=torch.long)
  mask = torch.zeros_like(ids)
  for i, p in enumerate(PROMPTS):
    ids[i, width - len(p):] = torch.tensor(p)
    mask[i, width - len(p):] = 1
  eos = 2
  hf_model.config.output_router_logits = False  # transformers' balance loss breaks on the cached decode steps
  with torch.no_grad():
    hf = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                           eos_token_id=eos, pad_token_id=0)[:, width:].tolist()
  ours = generate(loaded.config, loaded.params, PROMPTS, SamplingConfig(max_new_tokens=new, chunk=4), eos_id=eos,
                  batch_size=4)
  for row, result in zip(hf, ours):
    expected = row[:row.index(eos)] if eos in row else row
    assert result["ids"] == expected


def test_fixed_prompt_length_decodes_the_same_tokens(tmp_path):
  """Padding every batch to one prompt length (one compiled prefill and decoding step for all) changes nothing."""
  save_hf_model_dir("deepseek_v2", tmp_path)
  loaded = load_hf_model(tmp_path)
  sampling = SamplingConfig(max_new_tokens=8, chunk=4)
  bucketed = generate(loaded.config, loaded.params, PROMPTS, sampling, eos_id=None, batch_size=2)
  fixed = generate(loaded.config, loaded.params, PROMPTS, sampling, eos_id=None, batch_size=2, prompt_length=32)
  assert [r["ids"] for r in fixed] == [r["ids"] for r in bucketed]
  with pytest.raises(ValueError, match="a prompt of 7 tokens is longer than prompt_length=4"):
    generate(loaded.config, loaded.params, PROMPTS, sampling, eos_id=None, prompt_length=4)


def test_cached_decoding_equals_full_forward(tmp_path):
  save_hf_model_dir("deepseek_v2", tmp_path)
  loaded = load_hf_model(tmp_path)
  apply = jax.jit(Transformer(loaded.config).apply)
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, VOCAB, size=(2, 9)))
  full = apply({"params": loaded.params}, tokens).logits
  cache = init_cache(loaded.config, 2, 16)
  seg = jnp.ones((2, 5), jnp.int32)
  out = apply({"params": loaded.params}, tokens[:, :5], seg, jnp.broadcast_to(jnp.arange(5), (2, 5)),
                    cache=cache)
  np.testing.assert_allclose(out.logits, full[:, :5], atol=1e-5)
  cache = out.cache
  for t in range(5, 9):
    out = apply({"params": loaded.params}, tokens[:, t:t + 1], jnp.ones((2, 1), jnp.int32),
                      jnp.full((2, 1), t), cache=cache)
    cache = out.cache
    np.testing.assert_allclose(out.logits[:, 0], full[:, t], atol=1e-5)


def test_top_p_keeps_the_smallest_nucleus():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  draws = {int(sample_next(logits, jax.random.key(s), 1.0, 0.7)[0]) for s in range(200)}
  assert draws == {0, 1}  # 0.5 < 0.7, so the crossing token 1 is kept; 2 and 3 never drawn
  assert int(sample_next(logits, jax.random.key(0), 0.0, 1.0)[0]) == 0


def test_stop_strings_cut_text_and_need_a_tokenizer(tmp_path):
  save_hf_model_dir("deepseek_v2", tmp_path)
  loaded = load_hf_model(tmp_path)
  with pytest.raises(ValueError, match="stop strings need a tokenizer"):
    generate(loaded.config, loaded.params, PROMPTS, SamplingConfig(stop_strings=("\n\n",)), eos_id=None)
