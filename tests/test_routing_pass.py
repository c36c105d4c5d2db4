"""The scoring run's bound on sample length: a long sample is cut as `train` cuts it, and the command says so."""

import json

import numpy as np
import pytest
import transformers

from esft_jax.cli import main
from esft_jax.data.formatting import Example
from esft_jax.esft.routing_pass import cut_long_samples
from tests.data_helpers import chat, tiny_tokenizer, write_jsonl
from tests.hf_models import ARCHITECTURES


def test_cut_keeps_the_last_tokens():
  long, short = Example(np.arange(10), np.arange(10) % 2 == 0, "a:1"), Example(np.arange(3), np.ones(3, bool), "a:2")
  cut, n_cut = cut_long_samples([long, short], 4)
  assert n_cut == 1 and cut[1] is short
  np.testing.assert_array_equal(cut[0].ids_L, [6, 7, 8, 9])
  np.testing.assert_array_equal(cut[0].loss_mask_L, [True, False, True, False])
  with pytest.raises(ValueError, match="--seq-length must be positive, got 0"):
    cut_long_samples([long], 0)


def test_score_bounds_a_very_long_sample(tmp_path, capsys):
  config = ARCHITECTURES["deepseek_v2"]()
  config.vocab_size = 320  # the byte-level test tokenizer's 300 ids fit
  transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
  tiny_tokenizer(tmp_path / "model")
  records = [chat("what is two plus two?", " ".join(["four"] * 100_000))] + [chat("what is two?", "two")] * 3
  write_jsonl(tmp_path / "train.jsonl", records)
  main(["score", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "train.jsonl"), "--n-tokens",
        "100000", "--seq-length", "48", "--batch-size", "2", "--out", str(tmp_path / "scores")])
  out = capsys.readouterr().out
  assert "cut 1 of 4 samples to their last 48 tokens" in out
  n_tokens = int(out.split("samples, ")[1].split(" tokens")[0].replace(",", ""))
  assert n_tokens <= 4 * 48
  assert json.loads((tmp_path / "scores" / "summary.json").read_text())["token_scores"]
