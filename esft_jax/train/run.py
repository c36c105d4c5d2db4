"""`esft-jax train` as a function: model directory + data + method -> out_dir with adapter/, checkpoints,
metrics.jsonl and TensorBoard logs. The demo and the ablations call it too."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from esft_jax import sharding
from esft_jax.config import load_config
from esft_jax.data.pipeline import build_datasets
from esft_jax.esft.selection import load_expert_config
from esft_jax.esft.trainable import TrainPlan, plan_from_expert_config, validate_plan
from esft_jax.files import atomic_write_text
from esft_jax.interop.adapter import checkpoint_dtypes, load_adapter, save_adapter
from esft_jax.interop.hf import load_hf_model
from esft_jax.interop.tokenizer import load_tokenizer
from esft_jax.model.attention import most_segments, resolve_attention_impl
from esft_jax.param_roles import role
from esft_jax.paths import leaves_by_path, set_path
from esft_jax.train.config import DataConfig, TrainConfig
from esft_jax.train.run_folder import RUN_JSON, open_run_folder
from esft_jax.train.trainer import TrainResult, train


def make_plan(method: str, config, expert_config_path: str | Path | None, lora_rank: int = 8,
              lora_scale: float = 2.0) -> tuple[TrainPlan, dict | None]:
  if method == "esft":
    if expert_config_path is None:
      raise ValueError("--method esft needs --expert-config (written by `esft-jax select`)")
    expert_config = load_expert_config(expert_config_path, config.num_experts, config.moe_layer_ids)
    plan = plan_from_expert_config(expert_config)
    validate_plan(plan, config, str(expert_config_path))
    if not any(ids for _, ids in plan.experts.layers) and not (plan.shared_experts or plan.non_expert_modules):
      raise ValueError(f"{expert_config_path}: the expert config selects no expert in any layer (and neither "
                       "shared experts nor non-expert modules), so nothing would train; select experts with a "
                       "larger --top-p in `esft-jax select`")
    return plan, expert_config
  if method == "lora" and lora_rank < 1:
    raise ValueError(f"lora_rank={lora_rank} (--lora-rank): must be at least 1")
  return TrainPlan(method, lora_rank=lora_rank, lora_scale=lora_scale), None


def finetune(model_dir: str | Path, data: str, method: str, out_dir: str | Path, train_config: TrainConfig,
             data_config: DataConfig, batch_size: int, expert_config_path: str | Path | None = None,
             resume: bool = False, data_dir: str | Path | None = None, lora_rank: int = 8,
             param_dtype: str = "bfloat16", mesh: Mesh | None = None, overwrite: bool = False,
             check_weights: bool = False) -> TrainResult:
  """`batch_size` is the global micro-batch; each process reads its own share of the rows. Every setting, the
  plan and the run folder (`open_run_folder`: `resume`, `overwrite`, the lock) are checked before the model is
  read; `check_weights` refuses a checkpoint holding NaN or infinite values, naming the tensors."""
  out_dir = Path(out_dir)
  mesh = mesh or sharding.single_device_mesh()
  sharding.check_batch_size(batch_size, mesh)
  resolve_attention_impl(train_config.attention_impl, train_config.compute_dtype)  # before anything loads
  config = load_config(model_dir)
  plan, expert_config = make_plan(method, config, expert_config_path, lora_rank)
  args = {"model": str(model_dir), "data": str(data), "method": method, "batch_size": batch_size,
          "param_dtype": param_dtype, **({"lora_rank": lora_rank} if method == "lora" else {}),
          "train": dataclasses.asdict(train_config), "data_config": dataclasses.asdict(data_config)}
  record = {"args": args, "expert_config": expert_config}
  lock = open_run_folder(out_dir, record, resume, overwrite) if jax.process_index() == 0 else None
  try:
    # Each device reads only its shard of the model: none ever holds the whole of it.
    params = load_hf_model(model_dir, jnp.dtype(param_dtype), sharding.param_shardings(config, mesh),
                           check_finite=check_weights).params
    tokenizer = load_tokenizer(model_dir)
    datasets = build_datasets(data, tokenizer, data_config, batch_size, data_dir=data_dir)
    rows = [r.segment_ids_NxL for r in (datasets.train_rows, datasets.validation_rows) if len(r)]
    train_config = dataclasses.replace(train_config, max_segments=max((most_segments(s) for s in rows), default=1))
    args["train"] = dataclasses.asdict(train_config)
    train_iter = iter(datasets.train)
    val_batches = list(datasets.validation)
    if jax.process_index() == 0:
      atomic_write_text(out_dir / RUN_JSON, json.dumps(record, indent=2))
    params_like = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    stored_dtypes = checkpoint_dtypes(model_dir, config)  # trained tensors are stored as the base stores them

    def on_best(trainable):
      save_adapter(out_dir / "adapter", config, _adapter_base(params_like, trainable), plan, trainable,
                   expert_config, dtypes=stored_dtypes)

    return train(config, params, plan, train_iter, val_batches, out_dir, train_config, resume=resume,
                 on_best=on_best, run_record=record, data_state=train_iter.get_state,
                 restore_data=train_iter.set_state, mesh=mesh, donate_params=True)  # `params` is not used again
  finally:
    if lock is not None:
      lock.close()


def _adapter_base(params_like, trainable) -> dict:
  """Stands in for the frozen parameters when writing an adapter: save_adapter reads only their shapes and
  dtypes (an adapter holds just the trained tensors), so process 0 writes it without gathering a sharded
  model. Zeros on the host: jax arrays on the CPU where ESFT writes expert slices into their stacks (`.at`),
  free broadcast views elsewhere."""
  try:
    host = jax.local_devices(backend="cpu")[0]
  except RuntimeError:  # JAX_PLATFORMS leaves the CPU out: use this process's first accelerator
    host = jax.local_devices()[0]
  trained = leaves_by_path(trainable)
  base: dict = {}
  for path, leaf in leaves_by_path(params_like).items():
    if path in trained and role(path).kind == "routed_experts":  # ESFT slices, even a layer's full selection
      set_path(base, path, jnp.zeros(leaf.shape, leaf.dtype, device=host))
    else:
      set_path(base, path, np.broadcast_to(np.zeros((), leaf.dtype), leaf.shape))
  return base


def export_merged(model_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
  """Base model + adapter -> a full HF directory (tokenizer copied) that transformers loads."""
  from esft_jax.interop.hf import save_hf_model
  loaded = load_hf_model(model_dir)
  merged = load_adapter(adapter_dir, loaded.config, loaded.params)
  return save_hf_model(out_dir, loaded.config, merged, loaded.hf_config, tokenizer_dir=model_dir)
