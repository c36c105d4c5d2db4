"""The command line end to end on a tiny model: init -> data sample -> score -> select -> train -> export, eval, and
the refusals that protect a run."""

import argparse
import contextlib
import io
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import transformers

from esft_jax.cli import build_parser, main, train_configs
from esft_jax.data.pipeline import build_datasets
from esft_jax.esft.trainable import TrainPlan, init_trainable
from esft_jax.interop.adapter import save_adapter
from esft_jax.interop.hf import load_hf_model
from esft_jax.interop.safetensors_io import CheckpointReader, write_safetensors
from esft_jax.interop.tokenizer import load_tokenizer
from esft_jax.train.run_folder import open_run_folder
from tests.conftest import REPO
from tests.data_helpers import write_jsonl


_COMPILES = [0]


def _count_compiles(event: str, duration_secs: float, **kwargs) -> None:
  if event == "/jax/core/compile/backend_compile_duration":
    _COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compiles)


def _cli(*args):
  main([str(a) for a in args])


def _refused(capsys, *args) -> str:
  """Runs a command that must fail with a clean error before compiling anything; returns its message."""
  capsys.readouterr()
  before = _COMPILES[0]
  with pytest.raises(SystemExit) as exit_info:
    _cli(*args)
  assert exit_info.value.code == 2
  assert _COMPILES[0] == before, "compiled before refusing"
  return capsys.readouterr().err


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  """`init`'s model (with its tokenizer) and `data sample`'s intent task: the README's CPU quick path."""
  root = tmp_path_factory.mktemp("cli")
  with contextlib.redirect_stdout(io.StringIO()) as printed:
    _cli("init", "--model", "tiny-deepseek", "--out", root / "model", "--seed", "1")
  (root / "init.out").write_text(printed.getvalue())
  _cli("data", "sample", "--task", "intent", "--n-train", 80, "--n-test", 4, "--out", root)
  return root


TRAIN = ("--method", "esft", "--steps", 4, "--seq-length", 64, "--batch-size", 2, "--grad-accum", 1, "--eval-every",
         2, "--save-every", 2, "--log-every", 1, "--lr", 1e-3, "--compute-dtype", "float32", "--param-dtype",
         "float32", "--attention", "fused")


@pytest.fixture(scope="module")
def esft_run(workspace):
  """score -> select -> train on the workspace; the run folder is `root / "run"`."""
  root = workspace
  _cli("score", "--model", root / "model", "--data", root / "intent_train.jsonl", "--n-tokens", 400, "--batch-size", 4,
       "--write-logs", "--out", root / "scores")
  _cli("select", "--scores", root / "scores" / "summary.json", "--method", "token", "--top-p", 0.3,
       "--out", root / "experts.json")
  _cli(*_train_args(root, root / "run"))
  return root


def _train_args(root, out, *extra):
  return ("train", "--model", root / "model", "--data", root / "intent_train.jsonl", "--expert-config",
          root / "experts.json", "--out", out, *TRAIN, *extra)


def test_init_writes_a_model_folder_with_a_tokenizer(workspace):
  model = workspace / "model"
  printed = (workspace / "init.out").read_text()
  assert "tokenizer.json" in printed and "model.safetensors" in printed and "drawing random weights" in printed
  tokenizer = load_tokenizer(model)
  text = "User: play some jazz\n\nAssistant:"
  assert tokenizer.decode(tokenizer.encode(text)) == text
  config = json.loads((model / "config.json").read_text())
  assert (config["bos_token_id"], config["eos_token_id"]) == (tokenizer.bos_id, tokenizer.eos_id)
  assert tokenizer.vocab_size <= config["vocab_size"]
  # Merges learnt on the sample tasks' text: fewer tokens than bytes (a byte-level BPE without merges has as many).
  record = json.loads((workspace / "intent_train.jsonl").read_text().splitlines()[0])
  answer = record["messages"][1]["content"]
  assert len(tokenizer.encode(answer)) < 0.75 * len(answer.encode())


def test_score_select_train_export(esft_run, capsys):
  root = esft_run
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

  experts = json.loads((root / "experts.json").read_text())
  assert set(experts["experts"]) == {"1", "2", "3"}
  assert json.loads((root / "run" / "adapter" / "expert_cfg.json").read_text())["experts"] == experts["experts"]
  lines = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [line["step"] for line in lines if "loss" in line] == [1, 2, 3, 4]

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

  _cli("eval", "--model", root / "model", "--data", root / "intent_train.jsonl", "--metric", "loss", "--out",
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


@pytest.mark.parametrize("option, value", [("--steps", 0), ("--steps", -3), ("--lr", -1e-4), ("--lr", "nan"),
                                           ("--grad-accum", 0), ("--eval-every", 0), ("--save-every", 0),
                                           ("--log-every", 0), ("--val-fraction", 1.0), ("--seq-length", 1)])
def test_bad_train_values_are_refused_before_anything_compiles_or_is_written(workspace, tmp_path, capsys, option,
                                                                              value):
  err = _refused(capsys, *_train_args(workspace, tmp_path / "run", option, value))
  assert option in err and str(value) in err
  assert not (tmp_path / "run").exists()


def test_an_expert_config_with_no_experts_is_refused(esft_run, tmp_path, capsys):
  config = json.loads((esft_run / "experts.json").read_text())
  config["experts"] = {layer: [] for layer in config["experts"]}
  (tmp_path / "none.json").write_text(json.dumps(config))
  args = list(_train_args(esft_run, tmp_path / "run"))
  args[args.index("--expert-config") + 1] = tmp_path / "none.json"
  assert "selects no expert" in _refused(capsys, *args)
  assert not (tmp_path / "run").exists()


def _snapshot(folder):
  return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_run_folder_is_not_replaced_or_resumed_with_other_settings(esft_run, capsys):
  run = esft_run / "run"
  before = _snapshot(run)
  err = _refused(capsys, *_train_args(esft_run, run))
  assert "already holds a run" in err and "--overwrite" in err and "--resume" in err

  err = _refused(capsys, *_train_args(esft_run, run, "--resume", "--seq-length", 128, "--lr", 2e-3))
  assert "data_config.seq_length: 64 -> 128" in err and "train.lr: 0.001 -> 0.002" in err

  config = json.loads((esft_run / "experts.json").read_text())
  config["experts"]["1"] = sorted(set(range(4)) - set(config["experts"]["1"]))[:1]
  (esft_run / "other_experts.json").write_text(json.dumps(config))
  args = list(_train_args(esft_run, run, "--resume"))
  args[args.index("--expert-config") + 1] = esft_run / "other_experts.json"
  assert "expert_config.experts.1" in _refused(capsys, *args)
  assert "pass one of them" in _refused(capsys, *_train_args(esft_run, run, "--resume", "--overwrite"))
  assert _snapshot(run) == before


def test_a_second_train_on_a_locked_folder_fails_at_once(esft_run, tmp_path, capsys):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys; from pathlib import Path; from esft_jax.train.run_folder import "
       "open_run_folder; lock = open_run_folder(Path(sys.argv[1]), {}, False, False); print('locked', flush=True); "
       "sys.stdin.read()", str(tmp_path / "run")],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
  try:
    assert holder.stdout.readline().strip() == "locked"
    err = _refused(capsys, *_train_args(esft_run, tmp_path / "run"))
    assert f"another esft-jax train (pid {holder.pid}) is running" in err
  finally:
    holder.communicate("")
  assert not (tmp_path / "run" / "run.json").exists()


def test_overwrite_removes_only_the_earlier_run(tmp_path):
  run = tmp_path / "run"
  (run / "checkpoints" / "2").mkdir(parents=True)
  (run / "metrics.jsonl").write_text('{"step": 1}\n')
  (run / "notes.txt").write_text("mine")
  with pytest.raises(ValueError, match="already holds a run"):
    open_run_folder(run, {}, resume=False, overwrite=False)
  open_run_folder(run, {}, resume=False, overwrite=True).close()
  assert sorted(p.name for p in run.iterdir()) == [".lock", "notes.txt"]
  # A run that stopped before its first step left only its run.json: a new try needs no --overwrite.
  (run / "run.json").write_text("{}")
  open_run_folder(run, {"method": "esft"}, resume=False, overwrite=False).close()


def test_seed_sets_the_data_order(workspace):
  root = workspace
  tokenizer = load_tokenizer(root / "model")

  def first_batches(seed):
    args = build_parser().parse_args([str(a) for a in _train_args(root, root / "unused", "--seed", seed)])
    train_config, data_config = train_configs(args)
    assert train_config.seed == data_config.seed == seed
    train = iter(build_datasets(root / "intent_train.jsonl", tokenizer, data_config, 2).train)
    return np.stack([next(train)["inputs"] for _ in range(4)])

  first = first_batches(7)
  np.testing.assert_array_equal(first, first_batches(7))
  assert not np.array_equal(first, first_batches(0))


def test_eval_refuses_an_unwritable_destination_before_evaluating(workspace, tmp_path, capsys):
  (tmp_path / "file").write_text("")
  err = _refused(capsys, "eval", "--model", workspace / "model", "--data", workspace / "intent_train.jsonl",
                 "--metric", "loss", "--out", tmp_path / "file" / "r.json")
  assert "not a writable folder" in err


def test_nan_weights_are_named_by_train_and_fail_eval(esft_run, tmp_path, capsys):
  root = esft_run
  broken = tmp_path / "broken"
  broken.mkdir()
  for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
    (broken / name).write_bytes((root / "model" / name).read_bytes())
  reader = CheckpointReader(root / "model")
  tensors = {k: reader.get(k) for k in reader.keys()}
  tensors["model.norm.weight"] = np.full_like(tensors["model.norm.weight"], np.nan)
  write_safetensors(broken / "model.safetensors", tensors)
  args = list(_train_args(root, tmp_path / "run"))
  args[args.index("--model") + 1] = broken
  err = _refused(capsys, *args)
  assert "1 tensor holds NaN or infinite values: model.norm.weight" in err
  assert not (tmp_path / "run" / "run.json").exists()

  with pytest.raises(SystemExit) as exit_info:
    _cli("eval", "--model", broken, "--data", root / "intent_train.jsonl", "--metric", "loss", "--out",
         tmp_path / "new" / "loss.json")
  assert exit_info.value.code == 2
  assert "loss score is nan" in capsys.readouterr().err
  assert not (tmp_path / "new" / "loss.json").exists()


def test_eval_creates_the_destination_folder(workspace, tmp_path, capsys):
  items = [json.loads(line) for line in (workspace / "intent_test.jsonl").read_text().splitlines()]
  write_jsonl(tmp_path / "done.jsonl", [{"prediction": item["answers"][0], **item} for item in items])
  _cli("eval", "--completions", tmp_path / "done.jsonl", "--metric", "intent", "--out", tmp_path / "a" / "b.json")
  assert json.loads((tmp_path / "a" / "b.json").read_text())["mean"] == 1.0
