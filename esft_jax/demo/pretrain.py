"""The demo's base model: a small DeepSeekMoE-style model pretrained from scratch, offline.

A byte-level BPE is trained on the general corpus plus a little of each task's format; the model (fine-grained
routed experts plus shared experts, DeepSeek-V2's architecture) is pretrained on the same text with the
project's own training loop (full fine-tuning from a random start) and saved as a Hugging Face directory, so
every later step reads it like any other checkpoint. The directory is cached: a second run reuses it.
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
from esft_jax.demo.tasks import Task, format_examples
from esft_jax.esft.trainable import TrainPlan
from esft_jax.files import atomic_write_text
from esft_jax.interop.hf import save_hf_model
from esft_jax.interop.tokenizer import Tokenizer
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
  format_examples_per_task: int
  steps: int
  batch_size: int
  lr: float
  seed: int = 0
  compute_dtype: str = "float32"  # also what the demo fine-tunes, scores and evaluates in (bfloat16 on GPUs)
  # How routed experts are computed in every stage (esft_jax.model.experts): how, not what, so not in `key`.
  expert_impl: str = "auto"

  def key(self) -> str:
    spec = dataclasses.asdict(self)
    del spec["expert_impl"]
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]

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


def base_dir(spec: BaseSpec, cache_root: Path) -> Path:
  return cache_root / f"base-{spec.key()}"


def base_is_built(spec: BaseSpec, cache_root: Path) -> bool:
  return all((base_dir(spec, cache_root) / name).exists() for name in ("config.json", "tokenizer.json"))


def build_base(spec: BaseSpec, tasks: dict[str, Task], cache_root: Path, log=print) -> tuple[Path, list[str]]:
  """The pretrained base model's directory (built once per spec) and the held-out general texts. A process that
  asks for a base another process is building (two ablations started together, say) waits for it."""
  train_texts, held_out = general_split(spec.general_chars, spec.held_out_chars, spec.seed)
  model_dir = base_dir(spec, cache_root)
  cache_root.mkdir(parents=True, exist_ok=True)
  with open(cache_root / f"building-{spec.key()}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when its process dies
    if base_is_built(spec, cache_root):
      log(f"reusing the pretrained base model in {model_dir}")
    else:
      _pretrain(spec, tasks, train_texts, cache_root / f"building-{spec.key()}", model_dir, log)
  return model_dir, held_out


def _pretrain(spec: BaseSpec, tasks: dict[str, Task], train_texts: list[str], work: Path, model_dir: Path,
              log) -> None:
  formats = [r for task in tasks.values() for r in format_examples(task, spec.format_examples_per_task)]
  tokenizer = train_bpe_tokenizer(train_texts + [json.dumps(r, ensure_ascii=False) for r in formats],
                                  spec.vocab_size, work)
  examples = [text_example(tokenizer, t, f"general:{i}") for i, t in enumerate(train_texts)]
  examples += [_full_loss(format_conversation(parse_conversation(r, f"format:{i}"), tokenizer))
               for i, r in enumerate(formats)]
  rows = pack_documents(examples, spec.seq_length, truncate=True)
  train_rows, val_rows = split_rows(rows, 0.02, spec.seed)
  log(f"pretraining on {len(train_rows)} rows of {spec.seq_length} tokens "
      f"({int(train_rows.loss_mask_NxL.sum()):,} target tokens)")
  hf = spec.hf_config()
  config = config_from_hf(hf)
  params = init_params(config, jax.random.key(spec.seed))
  batches = iter(train_dataset(train_rows, spec.batch_size, seed=spec.seed, process_index=0, process_count=1))
  val = list(eval_dataset(val_rows, spec.batch_size, process_index=0, process_count=1))
  # Validation every tenth of the run, and the base is the best of those: a corpus this small is seen many times
  # over, and past some epoch more steps only overfit it.
  train_cfg = TrainConfig(steps=spec.steps, lr=spec.lr, schedule="cosine", warmup_steps=spec.steps // 20,
                          weight_decay=0.1, eval_every=max(1, spec.steps // 10), save_every=spec.steps,
                          log_every=10, seed=spec.seed, compute_dtype=spec.compute_dtype,
                          expert_impl=spec.expert_impl, max_segments=most_segments(rows.segment_ids_NxL))
  best = {}
  result = train(config, params, TrainPlan("fft"), batches, val, work / "pretrain", train_cfg,
                 on_best=lambda trainable: best.update(params=trainable))
  log(f"pretrained in {result.wall_seconds:.0f}s; best validation loss {result.best_val_loss:.3f}")
  save_hf_model(work / "model", config, best.get("params", result.trainable), hf, tokenizer_dir=work)
  atomic_write_text(work / "model" / "pretraining.json", json.dumps(
      {"spec": dataclasses.asdict(spec), "val_loss": result.best_val_loss, "seconds": result.wall_seconds}))
  # The run's metrics.jsonl and TensorBoard logs go with the base; its checkpoints and the tokenizer's working
  # files do not.
  shutil.rmtree(work / "pretrain" / "checkpoints")
  (work / "pretrain").rename(work / "model" / "pretraining")
  work.joinpath("model").rename(model_dir)
  shutil.rmtree(work)
