"""Adapters: what a fine-tuning run writes instead of a whole model, interchangeable with the official release.

- ESFT (and FFT) adapters: `expert_cfg.json` plus safetensors holding only the trained tensors, named as the
  HF checkpoint names them (`model.layers.{l}.mlp.experts.{e}.gate_proj.weight`, ...). The official PyTorch
  code loads them with a strict `load_state_dict` over its frozen model; esft-jax loads the released ones
  (legacy keys without the `model.` prefix included).
- LoRA adapters: PEFT's layout (`adapter_config.json`, `adapter_model.safetensors` with
  `base_model.model.<module>.lora_A.weight` [r, in] and `lora_B.weight` [out, r]; routed experts per expert).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from esft_jax.config import ModelConfig
from esft_jax.esft.trainable import TrainPlan, merge_trainable
from esft_jax.files import atomic_write_text
from esft_jax.interop.hf import hf_tensors, tensor_table
from esft_jax.interop.safetensors_io import SafetensorsFile, write_safetensors
from esft_jax.lora import apply_lora
from esft_jax.paths import get_path, leaves_by_path, set_path

EXPERT_CONFIG_FILE = "expert_cfg.json"
ADAPTER_FILE = "model.safetensors"
LORA_CONFIG_FILE = "adapter_config.json"
LORA_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def _write_json(path: Path, payload: Any) -> None:
  atomic_write_text(path, json.dumps(payload))


def trained_tensor_names(config: ModelConfig, plan: TrainPlan) -> set[str]:
  """The HF names of every tensor an ESFT or FFT run changes."""
  selected = plan.expert_ids
  names = set()
  for entry in tensor_table(config):
    path = "/".join(entry.path)
    if plan.trains_whole(path):
      names.update(entry.hf_names)
    elif plan.method == "esft" and entry.kind == "experts":
      layer = int(entry.path[0].removeprefix("layers_"))
      names.update(entry.hf_names[e] for e in selected.get(layer, ()))
  return names


def save_adapter(out_dir: str | Path, config: ModelConfig, params, plan: TrainPlan, trainable,
                 expert_config: dict | None = None) -> Path:
  """Writes the adapter of a run; `params` are the frozen parameters, `trainable` the trained tree."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  if plan.method == "lora":
    _save_lora(out_dir, config, trainable, plan)
    return out_dir
  merged = merge_trainable(plan, params, trainable)
  keep = trained_tensor_names(config, plan)
  write_safetensors(out_dir / ADAPTER_FILE, {n: a for n, a in hf_tensors(config, merged) if n in keep})
  if plan.method == "esft":
    cfg = expert_config or {"experts": {str(l): list(ids) for l, ids in plan.experts},
                            "shared_experts": plan.shared_experts, "non_expert_modules": plan.non_expert_modules}
    _write_json(out_dir / EXPERT_CONFIG_FILE, cfg)
  return out_dir


def _hf_targets(config: ModelConfig) -> dict[str, tuple[tuple[str, ...], int | None]]:
  """HF tensor name -> (Flax path, expert index or None), for reading adapters back."""
  targets = {}
  for entry in tensor_table(config):
    if entry.kind == "experts":
      targets.update({name: (entry.path, e) for e, name in enumerate(entry.hf_names)})
    else:
      targets[entry.hf_names[0]] = (entry.path, None)
  return targets


def _adapter_tensors(adapter_dir: Path) -> dict[str, tuple[SafetensorsFile, str]]:
  files = sorted(adapter_dir.glob("*.safetensors"))
  if not files:
    raise FileNotFoundError(f"{adapter_dir}: no .safetensors files; an ESFT adapter holds the trained tensors "
                            "as safetensors next to expert_cfg.json")
  found = {}
  for file in files:
    reader = SafetensorsFile(file)
    found.update({name: (reader, name) for name in reader.keys()})
  return found


def load_adapter(adapter_dir: str | Path, config: ModelConfig, params) -> dict:
  """The base parameters with an adapter applied (ESFT/FFT tensors written in, or LoRA merged)."""
  adapter_dir = Path(adapter_dir)
  if (adapter_dir / LORA_CONFIG_FILE).exists():
    return _load_lora(adapter_dir, config, params)
  targets = _hf_targets(config)
  merged = jax.tree_util.tree_map(lambda x: x, params)
  stacks: dict[tuple[str, ...], np.ndarray] = {}
  for stored_name, (reader, key) in _adapter_tensors(adapter_dir).items():
    name = stored_name if stored_name.startswith(("model.", "lm_head.")) else "model." + stored_name  # v1 keys
    if name not in targets:
      raise KeyError(f"{reader.path}: tensor {stored_name!r} is not a parameter of this {config.model_type} "
                     "model; was the adapter trained on another base model?")
    path, expert = targets[name]
    base = get_path(params, "/".join(path))
    array = reader.get(key)
    if expert is not None:
      stack = stacks.setdefault(path, np.array(jax.device_get(base)))
      expected = stack.shape[1:][::-1]
      if array.shape != expected:
        raise ValueError(f"{reader.path}: tensor {stored_name!r} has shape {array.shape}, expected {expected}")
      stack[expert] = array.T
      continue
    value = array.T if len(base.shape) == 2 and "kernel" in path[-1] else array
    if value.shape != base.shape:
      raise ValueError(f"{reader.path}: tensor {stored_name!r} has shape {array.shape}, which does not fit "
                       f"{'/'.join(path)} {tuple(base.shape)}")
    set_path(merged, "/".join(path), jnp.asarray(value, dtype=base.dtype))
  for path, stack in stacks.items():
    set_path(merged, "/".join(path), jnp.asarray(stack, dtype=get_path(params, "/".join(path)).dtype))
  return merged


def _lora_module_names(config: ModelConfig) -> dict[str, list[str]]:
  """Flax kernel path -> HF module name(s) (one per expert for stacked experts)."""
  names = {}
  for entry in tensor_table(config):
    if entry.kind in ("linear", "experts"):
      names["/".join(entry.path)] = [n.removesuffix(".weight") for n in entry.hf_names]
  return names


def _save_lora(out_dir: Path, config: ModelConfig, factors, plan: TrainPlan) -> None:
  modules = _lora_module_names(config)
  tensors = {}
  for path, leaf in leaves_by_path(factors).items():
    kernel_path, which = path.rsplit("/", 1)
    letter = "A" if which == "lora_a" else "B"
    array = np.asarray(jax.device_get(leaf))
    for i, module in enumerate(modules[kernel_path]):
      per_module = array[i] if array.ndim == 3 else array
      tensors[f"{PEFT_PREFIX}{module}.lora_{letter}.weight"] = np.ascontiguousarray(per_module.T)
  write_safetensors(out_dir / LORA_FILE, tensors)
  targets = sorted({m.rsplit(".", 1)[-1] for ms in modules.values() for m in ms})
  _write_json(out_dir / LORA_CONFIG_FILE, {
      "peft_type": "LORA", "r": plan.lora_rank, "lora_alpha": plan.lora_scale * plan.lora_rank,
      "lora_dropout": 0.0, "bias": "none", "target_modules": targets, "task_type": "CAUSAL_LM"})


def _load_lora(adapter_dir: Path, config: ModelConfig, params) -> dict:
  settings = json.loads((adapter_dir / LORA_CONFIG_FILE).read_text())
  scale = settings["lora_alpha"] / settings["r"]
  reader = SafetensorsFile(adapter_dir / LORA_FILE)
  factors: dict = {}
  for kernel_path, modules in _lora_module_names(config).items():
    for which, letter in (("lora_a", "A"), ("lora_b", "B")):
      keys = [f"{PEFT_PREFIX}{m}.lora_{letter}.weight" for m in modules]
      if not all(k in reader for k in keys):
        continue
      arrays = [reader.get(k).T for k in keys]
      set_path(factors, f"{kernel_path}/{which}", jnp.asarray(np.stack(arrays) if len(arrays) > 1 else arrays[0]))
  return apply_lora(params, factors, scale)

