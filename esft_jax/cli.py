"""The `esft-jax` command line: one subcommand per step of the ESFT workflow."""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

DESCRIPTION = """\
Expert-Specialized Fine-Tuning (ESFT) of Mixture-of-Experts LLMs in JAX.

A model is a Hugging Face directory (config.json + safetensors + tokenizer.json) or a preset name from
configs/models/ (deepseek-v2-lite, tiny-deepseek, ...). Run `esft-jax COMMAND --help` for each step.
"""


def _billions(n: int) -> str:
  return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def cmd_info(args: argparse.Namespace) -> None:
  from esft_jax.config import load_config
  from esft_jax.model.transformer import parameter_counts

  cfg = load_config(args.model)
  counts = parameter_counts(cfg)
  attention = "MLA" if cfg.attention == "mla" else ("MHA" if cfg.num_kv_heads == cfg.num_heads else "GQA")
  rows = [
      ("model", str(args.model)),
      ("architecture", f"{cfg.model_type} ({attention}, rope {cfg.rope.kind})"),
      ("layers", f"{cfg.num_layers} ({len(cfg.moe_layer_ids)} MoE, {cfg.num_layers - len(cfg.moe_layer_ids)} dense)"),
      ("hidden / heads", f"{cfg.hidden_size} / {cfg.num_heads} (kv {cfg.num_kv_heads})"),
      ("routed experts", f"{cfg.num_experts} of width {cfg.moe_intermediate_size}, top-{cfg.num_experts_per_tok} "
                         f"({cfg.scoring_func}, {cfg.topk_method})"),
      ("shared experts", f"fused width {cfg.shared_intermediate_size}" if cfg.shared_intermediate_size else "none"),
      ("total parameters", f"{_billions(counts.total)} ({counts.total:,})"),
      ("active per token", f"{_billions(counts.active_per_token)} ({counts.active_per_token:,}; without the "
                           "embedding lookup)"),
      ("routed-expert parameters", f"{_billions(counts.routed_experts)} ({counts.per_expert:,} per expert)"),
  ]
  width = max(len(k) for k, _ in rows)
  for key, value in rows:
    print(f"{key:<{width}}  {value}")


def cmd_init(args: argparse.Namespace) -> None:
  log = _timed_log()
  from esft_jax.config import config_from_hf, read_hf_config
  from esft_jax.data.jsonl import parse_conversation
  from esft_jax.data.tokenizer_training import corpus_texts, train_bpe_tokenizer
  from esft_jax.demo.tasks import make_all_tasks

  hf_config = read_hf_config(args.model)
  cfg = config_from_hf(hf_config, str(args.model))
  # The tokenizer first: it is quick, and a vocabulary too small for it fails before the weights are built.
  records = [parse_conversation(r, f"{t.name}:{i}") for t in make_all_tasks(200, 0, args.seed).values()
             for i, r in enumerate(t.train)]
  tokenizer = train_bpe_tokenizer(corpus_texts(records), cfg.vocab_size, args.out)
  hf_config = {**hf_config, "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
  log(f"wrote a byte-level BPE tokenizer ({tokenizer.vocab_size} tokens, trained on the text of "
      f"`esft-jax data sample`'s tasks) to {args.out / 'tokenizer.json'}")
  import jax
  import jax.numpy as jnp

  from esft_jax.interop.hf import save_hf_model
  from esft_jax.model.transformer import init_params, parameter_counts

  log(f"drawing random weights for {parameter_counts(cfg).total:,} parameters (compiling the initialisation "
      "takes a few seconds)")
  # XLA's own generator ("rbg"): a model's many draws compile faster than with the default threefry.
  key = jax.random.key(args.seed, impl="rbg")
  params = jax.jit(lambda key: init_params(cfg, key, param_dtype=jnp.dtype(args.dtype)))(key)
  save_hf_model(args.out, cfg, params, hf_config)
  log(f"wrote a random-weight {cfg.model_type} model to {args.out}: config.json, model.safetensors, "
      "tokenizer.json, tokenizer_config.json")


def _load_model(model_dir, adapter_dir, dtype: str):
  """A model directory's config and parameters, with an adapter (ESFT, FFT or LoRA) applied if given."""
  import jax.numpy as jnp

  from esft_jax.interop.adapter import load_adapter
  from esft_jax.interop.hf import load_hf_model

  loaded = load_hf_model(model_dir, dtype=jnp.dtype(dtype))
  params = load_adapter(adapter_dir, loaded.config, loaded.params) if adapter_dir else loaded.params
  return loaded.config, params


def cmd_score(args: argparse.Namespace) -> None:
  import jax

  from esft_jax.esft.scores import summary_from_logs, write_summary
  from esft_jax.sharding import mesh_from_flags

  mesh = mesh_from_flags(args.mesh, args.distributed)
  args.out.mkdir(parents=True, exist_ok=True)
  if args.from_logs:
    summary = summary_from_logs(args.from_logs)
  else:
    if not (args.model and args.data and args.n_tokens):
      raise ValueError("scoring a model needs --model, --data and --n-tokens (or import logs with --from-logs)")
    import jax.numpy as jnp

    from esft_jax.data.pipeline import format_records
    from esft_jax.data.sources import open_examples
    from esft_jax.esft.routing_pass import cut_long_samples, sample_until, score_examples
    from esft_jax.interop.tokenizer import load_tokenizer

    config, params = _load_model(args.model, args.adapter, args.dtype)
    examples = format_records(open_examples(args.data, args.data_dir), load_tokenizer(args.model))
    examples, n_cut = cut_long_samples(examples, args.seq_length)
    if n_cut:
      print(f"cut {n_cut} of {len(examples)} samples to their last {args.seq_length} tokens (--seq-length), as "
            "train's packing cuts them")
    chosen = sample_until(examples, args.n_tokens, args.seed)
    summary = score_examples(config, params, chosen, args.batch_size, dtype=jnp.dtype(args.dtype),
                             log_dir=args.out if args.write_logs else None, mesh=mesh)
    print(f"scored {len(chosen)} samples, {sum(len(e) for e in chosen):,} tokens")
  if jax.process_index() == 0:  # every process holds the same summary
    write_summary(args.out / "summary.json", summary)
    print(f"wrote {args.out / 'summary.json'}")


def cmd_select(args: argparse.Namespace) -> None:
  from esft_jax.esft.selection import load_expert_config, random_like, select_experts, write_expert_config
  from esft_jax.files import read_json

  if args.random:
    if not args.like:
      raise ValueError("--random needs --like CONFIG (the expert config whose per-layer counts to copy)")
    if args.num_experts is None:
      raise ValueError("--random needs --num-experts (routed experts per layer, 64 for DeepSeek-V2-Lite)")
    config = random_like(load_expert_config(args.like, args.num_experts), args.num_experts, args.seed)
  else:
    if not args.scores:
      raise ValueError("select needs --scores summary.json (from `esft-jax score`)")
    summary = read_json(args.scores, "write the scores with `esft-jax score`")
    config = select_experts(summary, args.method, args.top_p, train_shared_experts=args.train_shared_experts,
                            train_non_expert_modules=args.train_non_expert_modules)
  write_expert_config(args.out, config)
  counts = [len(v) for v in config["experts"].values()]
  print(f"wrote {args.out}: {sum(counts)} experts over {len(counts)} layers "
        f"({sum(counts) / len(counts):.2f} per layer)")


def train_configs(args: argparse.Namespace):
  """The TrainConfig and DataConfig of `esft-jax train`'s options; each refuses a bad value, naming its option."""
  from esft_jax.train.config import DataConfig, TrainConfig
  from esft_jax.train.optimizer import DEFAULT_LR

  train_config = TrainConfig(
      steps=args.steps, lr=DEFAULT_LR[args.method] if args.lr is None else args.lr, schedule=args.schedule,
      warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, grad_accum=args.grad_accum,
      eval_every=args.eval_every, save_every=args.save_every, log_every=args.log_every, seed=args.seed,
      compute_dtype=args.compute_dtype, remat=args.remat, attention_impl=args.attention,
      device_memory_gib=args.device_memory_gib)
  data_config = DataConfig(seq_length=args.seq_length, packing=args.packing,
                           validation_fraction=args.val_fraction, seed=args.seed)
  return train_config, data_config


def cmd_train(args: argparse.Namespace) -> None:
  train_config, data_config = train_configs(args)  # before anything is loaded
  from esft_jax.sharding import mesh_from_flags
  from esft_jax.train.run import finetune

  mesh = mesh_from_flags(args.mesh, args.distributed)
  if args.plan:
    _plan_train(args, train_config, mesh)
    return
  missing = [flag for flag, value in (("--data", args.data), ("--out", args.out)) if value is None]
  if missing:
    raise ValueError(f"{' and '.join(missing)} required (only --plan runs without them)")
  result = finetune(args.model, args.data, args.method, args.out, train_config, data_config, args.batch_size,
                    args.expert_config, args.resume, args.data_dir, args.lora_rank, args.param_dtype, mesh,
                    overwrite=args.overwrite, check_weights=args.check_weights)
  best = "n/a" if result.best_val_loss is None else f"{result.best_val_loss:.4f}"
  steps = f"{result.steps - result.first_step} steps" + (f" (from step {result.first_step} to {result.steps})"
                                                         if result.first_step else "")
  print(f"trained {result.trainable_params:,} parameters for {steps} in {result.wall_seconds:.0f}s; "
        f"best validation loss {best}; adapter in {args.out / 'adapter'}")


def _plan_train(args: argparse.Namespace, train_config, mesh) -> None:
  """`train --plan`: the step's memory per device, compiled from the model's config alone; exits 1 if it does not
  fit, after the options that would make it fit."""
  from esft_jax.train.memory_plan import advice, format_plan, plan_run

  memory = plan_run(args.model, args.method, args.expert_config, train_config, args.batch_size, args.seq_length,
                    args.lora_rank, args.param_dtype, mesh)
  print(format_plan(memory))
  if memory.fits is False:
    devices = 1 if mesh is None else mesh.size
    print("options that use less memory per device:")
    for option in advice(memory, args.remat, args.batch_size, args.grad_accum, devices):
      print(f"  - {option}")
    sys.exit(1)


def cmd_export(args: argparse.Namespace) -> None:
  from esft_jax.train.run import export_merged

  export_merged(args.model, args.adapter, args.out)
  print(f"wrote the merged model to {args.out}")


def cmd_eval(args: argparse.Namespace) -> None:
  from esft_jax.files import atomic_write_text

  if args.out:
    _check_output_file(args.out)
  if args.completions:
    from esft_jax.evaluate.metrics import score_completions
    mean, per_item = score_completions(args.completions, args.metric)
    results = {"metric": args.metric, "mean": mean, "scores": per_item}
    print(f"{args.metric}: {mean:.4f} over {len(per_item)} items")
  else:
    if not (args.model and args.data):
      raise ValueError("eval needs --model and --data (or --completions FILE to re-score saved generations)")
    import jax.numpy as jnp

    from esft_jax.evaluate.runner import run_evaluation
    from esft_jax.interop.tokenizer import load_tokenizer

    config, params = _load_model(args.model, args.adapter, args.dtype)
    results = run_evaluation(config, params, load_tokenizer(args.model), args.data, args.metric,
                             args.max_new_tokens, args.batch_size, jnp.dtype(args.dtype), args.data_dir)
    print(f"{args.metric}: {results['mean']:.4f}" + (f" over {len(results['items'])} items" if "items" in results
                                                      else f" over {results.get('tokens', 0)} tokens"))
  if not math.isfinite(results["mean"]):
    raise ValueError(f"the {args.metric} score is {results['mean']}: the model computes NaN or infinite values; "
                     "check its weights and the adapter's (esft-jax train --check-weights reads every tensor)")
  if args.out:
    atomic_write_text(args.out, json.dumps(results, ensure_ascii=False, indent=1))
    print(f"wrote {args.out}")


def _check_output_file(path: Path) -> None:
  """Creates the folder of an output file before the work that fills it, or says why it cannot be written."""
  if path.is_dir():
    raise ValueError(f"--out {path}: is a folder; name a file, e.g. {path / 'results.json'}")
  existing = next(p for p in (path.parent, *path.parent.parents) if p.exists())
  if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
    raise ValueError(f"--out {path}: cannot create it, {existing} is not a writable folder")
  path.parent.mkdir(parents=True, exist_ok=True)


def cmd_data_prepare(args: argparse.Namespace) -> None:
  from esft_jax.data.tfds_builder import prepare_tfds

  path = prepare_tfds(args.jsonl, args.name, args.data_dir, config=args.config, split=args.split,
                      overwrite=args.overwrite)
  print(f"built TFDS dataset {args.name} at {path}; read it with --data tfds:{args.name}:{args.split}")


def cmd_data_sample(args: argparse.Namespace) -> None:
  from esft_jax.demo.tasks import make_task
  from esft_jax.files import atomic_write_text

  task = make_task(args.task, args.n_train, args.n_test, args.seed)
  args.out.mkdir(parents=True, exist_ok=True)
  for split, records in (("train", task.train), ("test", task.test)):
    path = args.out / f"{task.name}_{split}.jsonl"
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    print(f"wrote {path}: {len(records)} {'conversations' if split == 'train' else 'evaluation items'}")
  print(f"evaluate with --metric {task.metric}")


def _add_mesh_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--mesh", help="device mesh over the axes data, fsdp, expert, tensor, e.g. data=2,fsdp=4 "
                                     "(sizes multiply to the device count; one may be -1). Default: one device")
  parser.add_argument("--distributed", action="store_true",
                      help="join the other processes first (jax.distributed.initialize: TPU pod slices, SLURM, "
                           "Open MPI); each process reads its own share of the data")


def cmd_figures(args: argparse.Namespace) -> None:
  from esft_jax.analysis.figures import plot_routing_figures
  from esft_jax.analysis.routing import FIGURES_JSON, routing_figures_from_logs

  logs: dict[str, Path] = {}
  for spec in args.logs:
    task, sep, directory = spec.partition("=")
    if not (sep and task and directory):
      raise ValueError(f"--logs {spec!r}: expected TASK=DIR, e.g. intent=runs/intent/routing_logs")
    if task in logs:
      raise ValueError(f"--logs: task {task!r} is given twice")
    logs[task] = Path(directory)
  figures = routing_figures_from_logs(logs, args.out, args.top_k, args.num_experts)
  paths = plot_routing_figures(figures, args.out)
  diagonal = ", ".join(f"{task} {figures['overlap'][task][task]:.2f}" for task in logs)
  print(f"shared top-{figures['top_k']} experts between the two halves of each task: {diagonal}")
  for path in [args.out / FIGURES_JSON, *paths]:
    print(f"wrote {path}")


def at_least_one(text: str) -> int:
  """An argparse type: an integer of at least 1."""
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
  return value


def _add_workspace_flags(parser: argparse.ArgumentParser) -> None:
  """The demo workspace's options, shared by `demo` and `ablate`."""
  parser.add_argument("--preset", default="tiny", choices=["tiny", "small"],
                      help="tiny: a laptop CPU; small: one GPU (64 experts top-6, 8 layers)")
  parser.add_argument("--out", type=Path, default=Path("runs/demo"),
                      help="the demo workspace: output directory")
  parser.add_argument("--cache", type=Path, help="where the pretrained base is cached (default OUT/cache)")
  parser.add_argument("--workers", type=at_least_one,
                      help="fine-tune-and-evaluate jobs run at once in worker processes (default: 1 for tiny, 4 for "
                           "small, where compilation would otherwise dominate)")
  parser.add_argument("--lr-search", type=Path, metavar="FILE",
                      help="the learning rates of an earlier demo's search at the same --preset (the lr_search.json "
                           "in that demo's --out; for --preset small, the committed "
                           "experiments/results/2026-12-08-demo-small-h100/lr_search.json), used instead of searching "
                           "where OUT has no search yet; an OUT whose search chose other rates is refused; the "
                           "report names the file")


def _timed_log():
  """Prints each line after the minutes and seconds since the command began: where a long run spends its time."""
  start = time.monotonic()

  def log(message: str) -> None:
    minutes, seconds = divmod(int(time.monotonic() - start), 60)
    print(f"[{minutes:3d}:{seconds:02d}] {message}", flush=True)

  return log


def cmd_demo(args: argparse.Namespace) -> None:
  from esft_jax.demo.experiment import run_demo

  run_demo(args.out, args.preset, args.cache, log=_timed_log(), workers=args.workers,
           seeds=tuple(args.seed) if args.seed else None, settings=tuple(args.setting) if args.setting else None,
           lr_search_from=args.lr_search)


def cmd_ablate(args: argparse.Namespace) -> None:
  from esft_jax.ablations.runner import run_ablation

  run_ablation(args.config, args.out, args.preset, args.cache, log=_timed_log(), workers=args.workers,
               seeds=tuple(args.seed) if args.seed else None, lr_search_from=args.lr_search)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
  """Shows each option's default after its help, unless it has none worth showing or the help already says it."""

  def _get_help_string(self, action):
    text = action.help or ""
    unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
    if not action.option_strings or unset or "default" in text:
      return text
    return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
  from esft_jax.data.packing import PACKINGS  # numpy and tokenizers only: --help stays quick
  from esft_jax.evaluate.metrics import METRICS, NON_GENERATIVE
  from esft_jax.demo.tasks import TASK_NAMES
  from esft_jax.train.config import SCHEDULES, DataConfig, TrainConfig

  parser = argparse.ArgumentParser(prog="esft-jax", description=DESCRIPTION, formatter_class=_HelpFormatter)
  command_parser = functools.partial(argparse.ArgumentParser, formatter_class=_HelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=command_parser)

  info = sub.add_parser("info", help="architecture and parameter counts of a model",
                        description="Print the architecture, total and per-token-active parameter counts, MoE "
                                    "layers, routed/shared experts and top-k. Reads config.json only.")
  info.add_argument("--model", required=True, help="HF model directory or preset name (e.g. deepseek-v2-lite)")
  info.set_defaults(func=cmd_info)

  init = sub.add_parser("init", help="write a randomly initialised model, with a tokenizer, as an HF directory",
                        description="Build a model from a preset or config.json with random weights and write it "
                                    "as a Hugging Face directory with a byte-level BPE tokenizer (trained on the "
                                    "text of `esft-jax data sample`'s tasks), which every command accepts: a "
                                    "model to try the workflow on, for tests and benchmarks.")
  init.add_argument("--model", required=True, help="preset name or directory holding config.json")
  init.add_argument("--out", required=True, type=Path, help="output directory")
  init.add_argument("--seed", type=int, default=0, help="seed of the random weights and the tokenizer's text")
  init.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the saved weights")
  init.set_defaults(func=cmd_init)

  score = sub.add_parser("score", help="routing statistics of a task (ESFT's expert relevance scores)",
                         description="Run the model over a seeded sample of the task's training data and write "
                                     "ESFT's summary.json: per MoE layer and routed expert, the token-selection "
                                     "ratio (token score) and the mean gate value (gate score). Or import routing "
                                     "logs of the official PyTorch scorer with --from-logs.")
  score.add_argument("--model", help="HF model directory (with --data and --n-tokens; not with --from-logs)")
  score.add_argument("--adapter", type=Path, help="adapter directory to apply first")
  score.add_argument("--data", help="training JSONL (ESFT messages format) or tfds:NAME[/CONFIG]:SPLIT")
  score.add_argument("--data-dir", help="TFDS data directory for tfds: data")
  score.add_argument("--n-tokens", type=int, help="token budget of the sample (the paper uses 131072; no default)")
  score.add_argument("--seed", type=int, default=5934875, help="shuffle seed, as ESFT's scorer")
  score.add_argument("--batch-size", type=int, default=8, help="samples per forward pass (each unpacked)")
  score.add_argument("--seq-length", type=int, default=4096,
                     help="longest sample scored: a longer one keeps its last SEQ_LENGTH tokens, as in train")
  score.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
  score.add_argument("--write-logs", action="store_true",
                     help="also write the official expert_weights_{layer}.txt logs (what `esft-jax figures` reads)")
  score.add_argument("--from-logs", type=Path, help="directory of official routing logs to import instead")
  score.add_argument("--out", required=True, type=Path, help="output directory for summary.json (and logs)")
  _add_mesh_flags(score)
  score.set_defaults(func=cmd_score)

  select = sub.add_parser("select", help="choose the experts to train from scores (top-p per layer)",
                          description="Per layer, sort experts by score and take them until the cumulative score "
                                      "reaches p (the crossing expert included). Paper defaults: token p=0.2, "
                                      "gate p=0.1. Writes ESFT's expert-config JSON.")
  select.add_argument("--scores", type=Path, help="summary.json from `esft-jax score`")
  select.add_argument("--method", default="token", choices=["token", "gate"],
                      help="token: share of the tokens routed to the expert; gate: its mean gate value")
  select.add_argument("--top-p", type=float, help="cumulative threshold in (0, 1] (default: the paper's)")
  select.add_argument("--train-shared-experts", action="store_true", help="also train the shared experts")
  select.add_argument("--train-non-expert-modules", action="store_true",
                      help="also train attention, norms, routers, embeddings and the head")
  select.add_argument("--random", action="store_true", help="random experts, as many per layer as --like has")
  select.add_argument("--like", type=Path, help="expert config whose counts --random copies")
  select.add_argument("--num-experts", type=int, help="routed experts per layer (for --random)")
  select.add_argument("--seed", type=int, default=0, help="seed of --random")
  select.add_argument("--out", required=True, type=Path, help="expert_config.json to write")
  select.set_defaults(func=cmd_select)

  train_defaults, data_defaults = TrainConfig(), DataConfig()  # the one source of the defaults
  tr = sub.add_parser("train", help="fine-tune with ESFT, full fine-tuning or LoRA",
                      description="One training loop; the methods differ only in what trains. ESFT trains the "
                                  "experts of --expert-config; fft everything; lora rank-r adapters on every "
                                  "linear map. Writes OUT/adapter (best validation loss), OUT/checkpoints "
                                  "(orbax; --resume continues), OUT/metrics.jsonl and OUT/tensorboard.")
  tr.add_argument("--model", required=True, help="HF model directory (with tokenizer.json)")
  tr.add_argument("--data", help="training JSONL or tfds:NAME[/CONFIG]:SPLIT (required unless --plan)")
  tr.add_argument("--data-dir", help="TFDS data directory")
  tr.add_argument("--method", required=True, choices=["esft", "fft", "lora"],
                  help="what trains: the experts of --expert-config, every parameter, or LoRA adapters")
  tr.add_argument("--expert-config", type=Path, help="expert config from `esft-jax select` (esft only)")
  tr.add_argument("--out", type=Path, help="run directory (adapter, checkpoints, logs; required unless --plan)")
  tr.add_argument("--steps", type=int, default=train_defaults.steps, help="optimizer steps")
  tr.add_argument("--seq-length", type=int, default=data_defaults.seq_length, help="tokens per packed sequence")
  tr.add_argument("--packing", default=data_defaults.packing, choices=list(PACKINGS),
                  help="esft: ESFT's greedy packing; documents: whole samples with segment ids")
  tr.add_argument("--val-fraction", type=float, default=data_defaults.validation_fraction,
                  help="share of the packed rows held out for the validation loss (ESFT's 98/2 split)")
  tr.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch")
  tr.add_argument("--grad-accum", type=int, default=train_defaults.grad_accum,
                  help="micro-batches per step (the default is ESFT's)")
  tr.add_argument("--lr", type=float, help="learning rate (default: esft 1e-5, fft 3e-5, lora 1e-4)")
  tr.add_argument("--schedule", default=train_defaults.schedule, choices=list(SCHEDULES),
                  help="learning-rate schedule")
  tr.add_argument("--warmup-steps", type=int, default=train_defaults.warmup_steps,
                  help="linear warm-up steps of the learning rate")
  tr.add_argument("--weight-decay", type=float, default=train_defaults.weight_decay, help="AdamW's weight decay")
  tr.add_argument("--lora-rank", type=int, default=8, help="rank of the LoRA adapters (lora only)")
  tr.add_argument("--eval-every", type=int, default=train_defaults.eval_every,
                  help="steps between validation losses; the adapter of the best one is kept")
  tr.add_argument("--save-every", type=int, default=train_defaults.save_every,
                  help="steps between orbax checkpoints")
  tr.add_argument("--log-every", type=int, default=train_defaults.log_every,
                  help="steps between metric lines (and TensorBoard points)")
  tr.add_argument("--seed", type=int, default=data_defaults.seed,
                  help="seed of every random choice: the packing, the validation split, the order of the training "
                       "rows and LoRA's initialisation (the default is ESFT's data seed)")
  tr.add_argument("--compute-dtype", default=train_defaults.compute_dtype, choices=["float32", "bfloat16"],
                  help="dtype of the forward and backward passes")
  tr.add_argument("--remat", action="store_true",
                  help="recompute each decoder layer in the backward pass: activation memory of one layer "
                       "instead of all (larger batches on the full model) for about a third more compute")
  tr.add_argument("--param-dtype", default="bfloat16", choices=["float32", "bfloat16"],
                  help="dtype of the frozen weights (trainable ones are fp32 master copies; the adapter stores "
                       "them in the base checkpoint's own dtype)")
  tr.add_argument("--attention", default=train_defaults.attention_impl, choices=["reference", "fused", "auto"],
                  help="fused: flash attention (cuDNN's on a GPU, bfloat16), which never stores the [batch, heads, "
                       "length, length] scores; reference: fp32 scores, materialised; auto (default): fused on a "
                       "Hopper GPU in bfloat16, else reference")
  tr.add_argument("--resume", action="store_true",
                  help="continue the run in OUT from its latest checkpoint; its settings (OUT/run.json) must match")
  tr.add_argument("--overwrite", action="store_true",
                  help="replace the run OUT holds (its run.json, checkpoints, metrics, TensorBoard logs, adapter)")
  tr.add_argument("--check-weights", action=argparse.BooleanOptionalAction, default=True,
                  help="refuse a model whose tensors hold NaN or infinite values, naming them (one pass over the "
                       "weights as they load)")
  tr.add_argument("--plan", action="store_true",
                  help="train nothing: compile the step on the mesh from the model's config.json (or a preset name) "
                       "and print each device's bytes of weights, optimizer state, gradients and temporaries, and "
                       "whether they fit (exit code 1 if not). A mesh larger than this machine plans on simulated "
                       "devices: XLA_FLAGS=--xla_force_host_platform_device_count=N on a CPU")
  tr.add_argument("--device-memory-gib", type=float,
                  help="memory of one device to check the step against (default: what the device's allocator "
                       "reports; a CPU reports none). A run that does not fit stops before its first step")
  _add_mesh_flags(tr)
  tr.set_defaults(func=cmd_train)

  export = sub.add_parser("export", help="merge an adapter into its base model (an HF directory)",
                          description="Write base model + adapter (ESFT, FFT or LoRA) as a full Hugging Face "
                                      "directory that transformers loads.")
  export.add_argument("--model", required=True, help="base HF model directory")
  export.add_argument("--adapter", required=True, type=Path, help="adapter directory")
  export.add_argument("--out", required=True, type=Path, help="output HF model directory")
  export.set_defaults(func=cmd_export)

  ev = sub.add_parser("eval", help="evaluate a model (or saved generations) with the paper's metrics",
                      description="Generate greedily for ESFT-format evaluation items (prompt, answers) and score "
                                  "them: intent, math, code, translation, summary, law. `--metric loss` gives "
                                  "held-out loss on training-format JSONL; `--metric choice` multiple-choice "
                                  "accuracy on {question, choices, answer} JSONL. Or re-score saved "
                                  "generations with --completions.")
  ev.add_argument("--model", help="HF model directory")
  ev.add_argument("--adapter", type=Path, help="adapter directory to apply (ESFT, FFT or LoRA)")
  ev.add_argument("--data", help="evaluation JSONL or tfds:NAME[/CONFIG]:SPLIT")
  ev.add_argument("--data-dir", help="TFDS data directory for tfds: data")
  ev.add_argument("--completions", type=Path,
                  help="saved generations to re-score instead of generating: the results JSON of `eval --out`, "
                       "or JSONL of ESFT's {\"example\": {\"raw_prediction\", \"raw_answers\"}} or "
                       "{\"prediction\", <item fields>} objects")
  ev.add_argument("--metric", required=True, choices=[*METRICS, *NON_GENERATIVE], help="the task's metric")
  ev.add_argument("--max-new-tokens", type=int, default=128, help="generation budget per item")
  ev.add_argument("--batch-size", type=int, default=8, help="prompts generated at once")
  ev.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
  ev.add_argument("--out", type=Path, help="results JSON with per-item scores")
  ev.set_defaults(func=cmd_eval)

  figs = sub.add_parser("figures", help="the paper's routing figures (its Figs. 2 and 3) from routing logs",
                        description="Read ESFT-format routing logs (expert_weights_{layer}.txt, one line per "
                                    "sample) of one or more tasks and write Figure 2 (share of gate mass by expert "
                                    "rank, mean and spread over layers), Figure 3 (shared top-K experts between "
                                    "the even lines of one task and the odd lines of another, mean over layers) "
                                    "and routing_figures.json.")
  figs.add_argument("--logs", required=True, nargs="+", metavar="TASK=DIR",
                    help="a task's name and its folder of expert_weights_*.txt logs (from `esft-jax score "
                         "--write-logs` or the official scorer)")
  figs.add_argument("--top-k", type=int, help="experts per token (default: inferred from the logs)")
  figs.add_argument("--num-experts", type=int, help="routed experts per layer (default: largest logged id + 1)")
  figs.add_argument("--out", required=True, type=Path, help="output directory")
  figs.set_defaults(func=cmd_figures)

  demo = sub.add_parser("demo", help="the paper's experiment in miniature, offline (the README's main job)",
                        description="The paper's protocol in miniature: generate six tasks (math and code to "
                                    "enhance, intent, summary, law and translation to adapt to) and four general "
                                    "instruction families; pretrain a small DeepSeekMoE-style base and align it on "
                                    "the general families (cached); score routing and select experts; search each "
                                    "method's learning rate on validation loss; fine-tune FFT, LoRA, ESFT-Token and "
                                    "ESFT-Gate on every task (mixed 1:1 with alignment data); evaluate each model "
                                    "on its task and on general ability; and write REPORT.md (each of the paper's "
                                    "findings tested beyond the spread over seeds), results.json and figures. "
                                    "Interrupted runs resume from what OUT already holds.")
  _add_workspace_flags(demo)
  demo.add_argument("--seed", type=int, nargs="+", metavar="S",
                    help="the seeds to run (each draws its own tasks, alignment data and fine-tuning order; "
                         "default: 0 for tiny, 0 1 2 for small); a seed already run is read from OUT")
  demo.add_argument("--setting", nargs="+", choices=["mixed", "unmixed"],
                    help="the data settings to fine-tune in: mixed (the task's data 1:1 with alignment data, the "
                         "paper's Table 1) and unmixed (the task's data alone, its Tables 9 and 10); default: mixed "
                         "for tiny, both for small")
  demo.set_defaults(func=cmd_demo)

  ablate = sub.add_parser("ablate", help="one of the paper's ablations on the demo's miniature",
                          description="Run the ablation a config under configs/ablations/ describes (threshold: "
                                      "Figure 6's sweep of p with LoRA ranks beside it; what_to_train: Table 3; "
                                      "random_experts: Table 4; granularity_groups: Figure 7, experts grouped "
                                      "into coarse ones; granularity_scratch: bases of other granularity pretrained "
                                      "alike; the *_small.json configs fit --preset small) in a demo workspace: "
                                      "the tasks, the cached base and the routing scores are shared with "
                                      "`esft-jax demo --out OUT`. Writes "
                                      "OUT/ablations/NAME/REPORT.md (mean ± std over seeds, each finding tested "
                                      "beyond the spread), results.json and figure.png (NAME: the config file's "
                                      "name), and for the granularity ablations OUT/ablations/granularity.png; "
                                      "resumes, per seed.")
  ablate.add_argument("config", type=Path, help="e.g. configs/ablations/threshold.json")
  _add_workspace_flags(ablate)
  ablate.add_argument("--seed", type=int, nargs="+", metavar="S",
                      help="the seeds to run (each the demo's workspace of that seed: its tasks, aligned base and "
                           "fine-tuning order, and for granularity_scratch its own pretraining of every base; "
                           "default: 0 for tiny, 0 1 2 for small); a seed already run is read from OUT")
  ablate.set_defaults(func=cmd_ablate)

  data = sub.add_parser("data", help="data utilities").add_subparsers(dest="data_command", required=True,
                                                                      parser_class=command_parser)
  prep = data.add_parser("prepare", help="build a TFDS dataset (ArrayRecord) from a JSONL file",
                         description="Build a tensorflow-datasets dataset from ESFT-format JSONL, readable as "
                                     "--data tfds:NAME:SPLIT by every command. No TensorFlow needed.")
  prep.add_argument("--jsonl", required=True, type=Path, help="ESFT-format JSONL (training or evaluation items)")
  prep.add_argument("--name", required=True, help="dataset name (NAME in tfds:NAME:SPLIT)")
  prep.add_argument("--data-dir", required=True, type=Path, help="TFDS data directory to write into")
  prep.add_argument("--config", help="builder config name")
  prep.add_argument("--split", default="train", help="split name")
  prep.add_argument("--overwrite", action="store_true", help="replace an existing dataset of this name")
  prep.set_defaults(func=cmd_data_prepare)
  sample = data.add_parser("sample", help="write a generated task's train and test JSONL (to try the workflow)",
                           description="Write one of the demo's generated tasks (math, code, intent, summary, law, "
                                       "translation: small template grammars shaped like the paper's tasks) as "
                                       "OUT/TASK_train.jsonl (ESFT's training format) and OUT/TASK_test.jsonl "
                                       "(its evaluation format). The same seed gives the same files everywhere.")
  sample.add_argument("--task", default="intent", choices=list(TASK_NAMES), help="which task")
  sample.add_argument("--n-train", type=at_least_one, default=400, help="training conversations")
  sample.add_argument("--n-test", type=at_least_one, default=50, help="evaluation items")
  sample.add_argument("--seed", type=int, default=0, help="seed of the generator")
  sample.add_argument("--out", required=True, type=Path, help="output folder")
  sample.set_defaults(func=cmd_data_sample)
  return parser


def main(argv: list[str] | None = None) -> None:
  args = build_parser().parse_args(argv)
  try:
    args.func(args)
  except (FileNotFoundError, ValueError, KeyError) as e:
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"esft-jax {args.command}: error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()
