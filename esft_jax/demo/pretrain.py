"""The demo's base model in the paper's two stages, offline: pretraining, then an alignment SFT.

1. Pretraining: a byte-level BPE is trained on the general corpus plus examples of every task family; the model
   (fine-grained routed experts plus shared experts, DeepSeek-V2's architecture) is pretrained from a random start
   on the general corpus and on examples of the enhancement tasks (math, code) only, so that it has partial skill
   there and none on the adaptation tasks, as DeepSeek-V2-Lite has. The same for every seed.
2. Alignment: the pretrained model is fine-tuned (all parameters, loss on the answers) on the general instruction
   families, which exclude math and code, as the paper's "vanilla" model was. Per seed, since the seed draws the
   alignment data.

Both are trained with the project's own training loop and saved as Hugging Face directories, so every later step
reads them like any other checkpoint. Each is cached: a second run reuses it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import shutil
from pathlib import Path

import jax
import numpy as np

from esft_jax.config import config_from_hf
from esft_jax.data.formatting import Example, format_conversation
from esft_jax.data.jsonl import parse_conversation
from esft_jax.data.packing import pack_documents
from esft_jax.data.pipeline import eval_dataset, split_rows, train_dataset
from esft_jax.data.tokenizer_training import train_bpe_tokenizer
from esft_jax.demo.corpus import general_split
from esft_jax.demo.tasks import ENHANCEMENT_TASKS, GENERAL_TASK_NAMES, TASK_NAMES, pretraining_examples
from esft_jax.esft.trainable import TrainPlan
from esft_jax.files import atomic_write_text
from esft_jax.interop.hf import load_hf_model, save_hf_model
from esft_jax.interop.tokenizer import Tokenizer, load_tokenizer
from esft_jax.model.attention import most_segments
from esft_jax.model.transformer import init_params
from esft_jax.train.trainer import TrainConfig, train


@dataclasses.dataclass(frozen=True)
class BaseSpec:
  """What defines the base model; its hash names the cache directory."""
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  routed_experts: int
  experts_per_token: int
  shared_experts: int
  expert_width: int
  dense_width: int
  kv_lora_rank: int
  seq_length: int
  general_chars: int
  held_out_chars: int
  enhancement_examples: int  # per enhancement task, in the pretraining text
  steps: int
  batch_size: int
  lr: float
  seed: int = 0
  compute_dtype: str = "float32"  # also what the demo fine-tunes, scores and evaluates in (bfloat16 on GPUs)
  # How routed experts are computed in every stage (esft_jax.model.experts): how, not what, so not in `key`.
  expert_impl: str = "auto"

  def key(self) -> str:
    """Names the cached base: the spec and the enhancement examples it pretrains on (so a change to a task's
    grammar pretrains anew)."""
    spec = dataclasses.asdict(self)
    del spec["expert_impl"]
    examples = [pretraining_examples(name, self.enhancement_examples) for name in ENHANCEMENT_TASKS]
    return hashlib.sha256(json.dumps([spec, examples], sort_keys=True).encode()).hexdigest()[:12]

  def hf_config(self) -> dict:
    head = self.hidden_size // self.num_heads
    return {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
        "vocab_size": self.vocab_size, "hidden_size": self.hidden_size, "intermediate_size": self.dense_width,
        "moe_intermediate_size": self.expert_width, "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_heads,
        "n_shared_experts": self.shared_experts, "n_routed_experts": self.routed_experts,
        "num_experts_per_tok": self.experts_per_token, "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "routed_scaling_factor": 1.0, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
        "scoring_func": "softmax", "norm_topk_prob": False, "aux_loss_alpha": 0.001, "seq_aux": True,
        "kv_lora_rank": self.kv_lora_rank, "q_lora_rank": None, "qk_nope_head_dim": head,
        "qk_rope_head_dim": head // 2, "v_head_dim": head, "hidden_act": "silu",
        "max_position_embeddings": 4 * self.seq_length, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "attention_bias": False, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
        "pad_token_id": 2, "torch_dtype": "float32"}


def text_example(tokenizer: Tokenizer, text: str, source: str) -> Example:
  """BOS + text + EOS with loss on every token: pretraining text and held-out general text."""
  ids = np.asarray([tokenizer.bos_id] + tokenizer.encode(text) + [tokenizer.eos_id], np.int32)
  return Example(ids, np.ones(len(ids), bool), source)


def _full_loss(example: Example) -> Example:
  """Pretraining learns the whole formatted sample, question included."""
  mask = np.ones(len(example.ids_L), bool)
  mask[0] = False
  return dataclasses.replace(example, loss_mask_L=mask)


@dataclasses.dataclass(frozen=True)
class AlignSpec:
  """The alignment SFT: how many records of each general family it trains on, and how."""
  examples_per_family: int
  steps: int
  batch_size: int
  lr: float


def base_dir(spec: BaseSpec, cache_root: Path) -> Path:
  return cache_root / f"base-{spec.key()}"


def aligned_dir(spec: BaseSpec, align: AlignSpec, records: list[dict], seed: int, cache_root: Path) -> Path:
  """Named by the base, the alignment's settings and its data, so a change of any of them aligns anew."""
  what = json.dumps([dataclasses.asdict(align), records], sort_keys=True)
  return cache_root / f"aligned-{spec.key()}-{hashlib.sha256(what.encode()).hexdigest()[:12]}-seed{seed}"


def _is_built(model_dir: Path) -> bool:
  return all((model_dir / name).exists() for name in ("config.json", "tokenizer.json"))


def base_is_built(spec: BaseSpec, cache_root: Path) -> bool:
  return _is_built(base_dir(spec, cache_root))


def _built_once(model_dir: Path, build, log) -> None:
  """Runs `build(work_dir)` unless `model_dir` exists; a process that asks for a model another process is
  building (two ablations started together, say) waits for it."""
  model_dir.parent.mkdir(parents=True, exist_ok=True)
  with open(model_dir.parent / f"building-{model_dir.name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when its process dies
    if _is_built(model_dir):
      log(f"reusing {model_dir}")
    else:
      work = model_dir.parent / f"building-{model_dir.name}"
      build(work)
      work.joinpath("model").rename(model_dir)
      shutil.rmtree(work)


def build_base(spec: BaseSpec, cache_root: Path, log=print) -> tuple[Path, list[str]]:
  """The pretrained base model's directory (built once per spec) and the held-out general texts."""
  train_texts, held_out = general_split(spec.general_chars, spec.held_out_chars, spec.seed)
  model_dir = base_dir(spec, cache_root)
  _built_once(model_dir, lambda work: _pretrain(spec, train_texts, work, log), log)
  return model_dir, held_out


def build_aligned(spec: BaseSpec, align: AlignSpec, alignment_records: list[dict], seed: int, cache_root: Path,
                  log=print) -> Path:
  """The pretrained base after the alignment SFT on `alignment_records` (built once per spec, align and seed)."""
  pretrained, _ = build_base(spec, cache_root, log)
  model_dir = aligned_dir(spec, align, alignment_records, seed, cache_root)
  _built_once(model_dir, lambda work: _align(spec, align, pretrained, alignment_records, seed, work, log), log)
  return model_dir


def _train_and_save(spec: BaseSpec, hf: dict, params, examples: list[Example], steps: int, batch_size: int,
                    lr: float, seed: int, tokenizer_dir: Path, work: Path, log) -> dict:
  """Trains every parameter on `examples` (packed, 2% held out for validation), keeps the best validation
  checkpoint and writes it with its metrics and TensorBoard logs as a Hugging Face directory, `work / "model"`."""
  config = config_from_hf(hf)
  rows = pack_documents(examples, spec.seq_length, truncate=True)
  train_rows, val_rows = split_rows(rows, 0.02, seed)
  log(f"training on {len(train_rows)} rows of {spec.seq_length} tokens "
      f"({int(train_rows.loss_mask_NxL.sum()):,} target tokens)")
  batches = iter(train_dataset(train_rows, batch_size, seed=seed, process_index=0, process_count=1))
  val = list(eval_dataset(val_rows, batch_size, process_index=0, process_count=1))
  # Validation every tenth of the run, and the model is the best of those: a corpus this small is seen many times
  # over, and past some epoch more steps only overfit it.
  train_cfg = TrainConfig(steps=steps, lr=lr, schedule="cosine", warmup_steps=steps // 20, weight_decay=0.1,
                          grad_accum=1, eval_every=max(1, steps // 10), save_every=steps, log_every=10, seed=seed,
                          compute_dtype=spec.compute_dtype, expert_impl=spec.expert_impl,
                          max_segments=most_segments(rows.segment_ids_NxL))
  best = {}
  result = train(config, params, TrainPlan("fft"), batches, val, work / "train", train_cfg,
                 on_best=lambda trainable: best.update(params=trainable))
  log(f"trained in {result.wall_seconds:.0f}s; best validation loss {result.best_val_loss:.3f}")
  save_hf_model(work / "model", config, best.get("params", result.trainable), hf, tokenizer_dir=tokenizer_dir)
  # The run's metrics.jsonl and TensorBoard logs go with the model; its checkpoints do not.
  shutil.rmtree(work / "train" / "checkpoints")
  (work / "train").rename(work / "model" / "training")
  return {"val_loss": result.best_val_loss, "seconds": result.wall_seconds}


def _pretraining_examples(spec: BaseSpec, tokenizer: Tokenizer, train_texts: list[str]) -> list[Example]:
  """The pretraining corpus as examples: general text, and the enhancement tasks' examples with loss on every
  token."""
  enhancement = [r for name in ENHANCEMENT_TASKS for r in pretraining_examples(name, spec.enhancement_examples)]
  examples = [text_example(tokenizer, t, f"general:{i}") for i, t in enumerate(train_texts)]
  return examples + [_full_loss(format_conversation(parse_conversation(r, f"enhancement:{i}"), tokenizer))
                     for i, r in enumerate(enhancement)]


def _pretrain(spec: BaseSpec, train_texts: list[str], work: Path, log) -> None:
  # The tokenizer sees every family's vocabulary (a tokenizer is not a skill); the model sees only the
  # enhancement tasks' examples.
  vocabulary = [r for name in TASK_NAMES + GENERAL_TASK_NAMES
                for r in pretraining_examples(name, spec.enhancement_examples if name in ENHANCEMENT_TASKS else 50)]
  tokenizer = train_bpe_tokenizer(train_texts + [json.dumps(r, ensure_ascii=False) for r in vocabulary],
                                  spec.vocab_size, work)
  log("pretraining the base model")
  hf = spec.hf_config()
  params = init_params(config_from_hf(hf), jax.random.key(spec.seed))
  metrics = _train_and_save(spec, hf, params, _pretraining_examples(spec, tokenizer, train_texts), spec.steps,
                            spec.batch_size, spec.lr, spec.seed, work, work, log)
  atomic_write_text(work / "model" / "pretraining.json", json.dumps({"spec": dataclasses.asdict(spec), **metrics}))


def _align(spec: BaseSpec, align: AlignSpec, pretrained: Path, records: list[dict], seed: int, work: Path,
           log) -> None:
  """Fine-tunes every parameter on the alignment records (loss on the answers) with as many pretraining examples
  replayed beside them: without replay a model this small forgets its pretraining (held-out text and the
  enhancement tasks' skill) in a few epochs of short answers, where the paper's 16B model keeps what pretraining
  taught it."""
  tokenizer = load_tokenizer(pretrained)
  examples = [format_conversation(parse_conversation(r, f"alignment:{i}"), tokenizer) for i, r in enumerate(records)]
  train_texts, _ = general_split(spec.general_chars, spec.held_out_chars, spec.seed)
  replay = _pretraining_examples(spec, tokenizer, train_texts)
  rng = np.random.default_rng(seed)
  examples += [replay[i] for i in rng.choice(len(replay), min(len(replay), len(examples)), replace=False)]
  examples = [examples[i] for i in rng.permutation(len(examples))]
  log(f"aligning the base model on {len(records)} general instructions and as many replayed pretraining "
      f"examples (seed {seed})")
  base = load_hf_model(pretrained)
  metrics = _train_and_save(spec, base.hf_config, base.params, examples, align.steps, align.batch_size, align.lr,
                            seed, pretrained, work, log)
  atomic_write_text(work / "model" / "alignment.json", json.dumps(
      {"align": dataclasses.asdict(align), "seed": seed, "pretrained": pretrained.name, **metrics}))
