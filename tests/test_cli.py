"""The command line end to end on a tiny model: score -> select -> train -> export, plus eval and errors."""

import argparse
import json

import numpy as np
import pytest
import transformers

from esft_jax.cli import build_parser, main
from esft_jax.data.tokenizer_training import train_bpe_tokenizer
from esft_jax.esft.trainable import TrainPlan, init_trainable
from esft_jax.interop.adapter import save_adapter
from esft_jax.interop.hf import load_hf_model
from tests.data_helpers import TEXTS, chat, write_jsonl


def _cli(*args):
  main([str(a) for a in args])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  root = tmp_path_factory.mktemp("cli")
  _cli("init", "--model", "tiny-deepseek", "--out", root / "model", "--seed", "1")
  train_bpe_tokenizer(TEXTS, 400, root / "model")
  rng = np.random.default_rng(0)
  records = [chat(f"what is {a} plus {b}?", f"{a + b}") for a, b in rng.integers(0, 50, size=(80, 2))]
  write_jsonl(root / "train.jsonl", records)
  return root


def test_score_select_train_export(workspace, capsys):
  root = workspace
  _cli("score", "--model", root / "model", "--data", root / "train.jsonl", "--n-tokens", 400, "--batch-size", 4,
       "--write-logs", "--out", root / "scores")
  summary = json.loads((root / "scores" / "summary.json").read_text())
  assert sorted(summary["token_scores"], key=int) == ["1", "2", "3"]
  for layer in summary["token_scores"].values():
    assert abs(sum(layer.values()) - 1.0) < 2e-3  # token scores sum to 1 per layer (at 4 decimals)

  # The routing logs written alongside give the same summary when imported the official way.
  _cli("score", "--from-logs", root / "scores", "--out", root / "imported")
  imported = json.loads((root / "imported" / "summary.json").read_text())
  assert imported["token_scores"] == summary["token_scores"]
  for layer, experts in summary["gate_scores"].items():
    for expert, value in experts.items():
      assert abs(imported["gate_scores"][layer][expert] - value) <= 2e-4

  _cli("select", "--scores", root / "scores" / "summary.json", "--method", "token", "--top-p", 0.3,
       "--out", root / "experts.json")
  experts = json.loads((root / "experts.json").read_text())
  assert set(experts["experts"]) == {"1", "2", "3"}

  _cli("train", "--model", root / "model", "--data", root / "train.jsonl", "--method", "esft", "--expert-config",
       root / "experts.json", "--out", root / "run", "--steps", 4, "--seq-length", 64, "--batch-size", 2,
       "--grad-accum", 1, "--eval-every", 2, "--save-every", 2, "--log-every", 1, "--lr", 1e-3,
       "--compute-dtype", "float32", "--param-dtype", "float32", "--attention", "fused")
  out = capsys.readouterr().out
  assert "trained" in out and "optimizer state" in out
  assert json.loads((root / "run" / "adapter" / "expert_cfg.json").read_text())["experts"] == experts["experts"]
  assert len((root / "run" / "metrics.jsonl").read_text().splitlines()) >= 4

  _cli("export", "--model", root / "model", "--adapter", root / "run" / "adapter", "--out", root / "merged")
  model = transformers.AutoModelForCausalLM.from_pretrained(root / "merged")
  assert type(model).__name__ == "DeepseekV2ForCausalLM"
  assert (root / "merged" / "tokenizer.json").exists()


def test_bad_select_input_exits_cleanly_and_writes_nothing(workspace, tmp_path, capsys):
  summary = tmp_path / "summary.json"
  summary.write_text(json.dumps({"token_scores": {"1": {"0": 0.5, "1": 0.5}}, "gate_scores": {}}))
  with pytest.raises(SystemExit) as exit_info:
    _cli("select", "--scores", summary, "--top-p", 1.5, "--out", tmp_path / "cfg.json")
  assert exit_info.value.code == 2
  assert "1.5" in capsys.readouterr().err
  assert not (tmp_path / "cfg.json").exists()


def test_eval_rescoring_reproduces_released_intent_scores(esft_reference, tmp_path, capsys):
  _cli("eval", "--completions", esft_reference / "intent" / "completions_gate.jsonl", "--metric", "intent",
       "--out", tmp_path / "results.json")
  assert "intent: 0.8000 over 500 items" in capsys.readouterr().out
  assert json.loads((tmp_path / "results.json").read_text())["mean"] == pytest.approx(0.8)


def test_eval_a_model_generation_loss_and_choice(workspace, tmp_path, capsys):
  root = workspace
  items = [{"prompt": f"User: what is {a} plus {b}?\n\nAssistant:", "answers": [str(a + b)]}
           for a, b in [(1, 2), (3, 4), (10, 5)]]
  write_jsonl(tmp_path / "eval.jsonl", items)
  _cli("eval", "--model", root / "model", "--data", tmp_path / "eval.jsonl", "--metric", "math",
       "--max-new-tokens", 6, "--batch-size", 2, "--out", tmp_path / "gen.json")
  gen = json.loads((tmp_path / "gen.json").read_text())
  assert len(gen["items"]) == 3 and all(r["score"] in (0.0, 1.0) for r in gen["items"])
  assert gen["items"][0]["example"]["raw_answers"] == ["3"]

  _cli("eval", "--model", root / "model", "--data", root / "train.jsonl", "--metric", "loss", "--out",
       tmp_path / "loss.json")
  loss = json.loads((tmp_path / "loss.json").read_text())
  assert 3.0 < loss["mean"] < 9.0 and loss["tokens"] > 80  # near log(vocab) for random weights

  write_jsonl(tmp_path / "mc.jsonl", [{"question": "2 plus 2 is", "choices": ["4", "five", "22"], "answer": 0}] * 2)
  loaded = load_hf_model(root / "model")
  plan = TrainPlan("lora", lora_rank=2)
  save_adapter(tmp_path / "lora", loaded.config, loaded.params, plan, init_trainable(plan, loaded.params))
  _cli("eval", "--model", root / "model", "--adapter", tmp_path / "lora", "--data", tmp_path / "mc.jsonl",
       "--metric", "choice", "--out", tmp_path / "mc.json")
  mc = json.loads((tmp_path / "mc.json").read_text())
  assert len(mc["items"]) == 2 and len(mc["items"][0]["logliks"]) == 3
  assert mc["items"][0]["logliks"] == mc["items"][1]["logliks"]


def test_figures_from_the_official_intent_logs(esft_reference, tmp_path, capsys):
  _cli("figures", "--logs", f"intent={esft_reference / 'intent' / 'routing_logs'}", "--out", tmp_path)
  assert "intent 5.81" in capsys.readouterr().out
  figures = json.loads((tmp_path / "routing_figures.json").read_text())
  assert abs(sum(figures["concentration"]["intent"]) - 1.0) < 1e-6
  assert (tmp_path / "figure3_overlap.png").read_bytes()[:4] == b"\x89PNG"


def test_figures_rejects_a_bad_task_spec(tmp_path, capsys):
  with pytest.raises(SystemExit):
    _cli("figures", "--logs", "no-equals-sign", "--out", tmp_path)
  assert "expected TASK=DIR" in capsys.readouterr().err


def test_every_option_has_help_and_shows_its_default():
  def parsers(parser):
    yield parser
    for action in parser._actions:
      if isinstance(action, argparse._SubParsersAction):
        for sub in action.choices.values():
          yield from parsers(sub)

  all_parsers = list(parsers(build_parser()))
  silent = [f"{p.prog} {a.option_strings[0]}" for p in all_parsers for a in p._actions
            if a.option_strings and not a.help]
  assert not silent, f"options without help: {silent}"
  train = next(p for p in all_parsers if p.prog.endswith(" train")).format_help()
  assert "(default: 500)" in train and "(default: 0)" in train  # --steps, and a zero default (--warmup-steps)
  assert "(default: None)" not in train
