"""Adapters: what a fine-tuning run writes instead of a whole model, interchangeable with the official release.

- ESFT (and FFT) adapters: `expert_cfg.json` plus safetensors holding only the trained tensors, named as the
  HF checkpoint names them (`model.layers.{l}.mlp.experts.{e}.gate_proj.weight`, ...) and stored in the base
  checkpoint's dtypes. The official PyTorch code loads them with a strict `load_state_dict` over its frozen
  model; esft-jax loads the released ones (legacy keys without the `model.` prefix included).
- LoRA adapters: PEFT's layout (`adapter_config.json`, `adapter_model.safetensors` with
  `base_model.model.<module>.lora_A.weight` [r, in] and `lora_B.weight` [out, r]; routed experts written per
  expert, which PEFT fuses itself on transformers 5). Reading also takes PEFT's factors of transformers 5's
  fused expert tensors. Every tensor in an adapter must map to a weight of the base.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from esft_jax.config import ModelConfig
from esft_jax.esft.trainable import TrainPlan
from esft_jax.files import atomic_write_text
from esft_jax.interop.hf import tensor_table
from esft_jax.interop.safetensors_io import CheckpointReader, SafetensorsFile, write_safetensors
from esft_jax.lora import apply_lora
from esft_jax.paths import get_path, layer_index, leaves_by_path, set_path

EXPERT_CONFIG_FILE = "expert_cfg.json"
ADAPTER_FILE = "model.safetensors"
LORA_CONFIG_FILE = "adapter_config.json"
LORA_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def _write_json(path: Path, payload: Any) -> None:
  atomic_write_text(path, json.dumps(payload))


def checkpoint_dtypes(model_dir: str | Path, config: ModelConfig) -> dict[str, np.dtype]:
  """Flax parameter path -> the dtype its tensor has in the HF checkpoint (per-expert or fused experts), read
  from the safetensors headers alone: the dtype an adapter of this base stores its trained tensors in. 8-bit
  (block-quantized FP8) weights map to bfloat16, since a trained tensor has no quantization scale; it is what
  DeepSeek's fp8_cast_bf16.py turns them into."""
  reader = CheckpointReader(model_dir)
  dtypes = {}
  for entry in tensor_table(config):
    name = entry.hf_names[0]
    if name not in reader and entry.kind == "experts":  # transformers' fused layout
      fused = "down_proj" if entry.path[-1] == "down_proj" else "gate_up_proj"
      name = f"{name.rsplit('.experts.', 1)[0]}.experts.{fused}"
    if name not in reader:
      raise KeyError(f"{reader.dir}: tensor {name!r} is missing from the checkpoint")
    stored = reader.dtype(name)
    dtypes["/".join(entry.path)] = np.dtype(ml_dtypes.bfloat16) if stored.itemsize == 1 else stored
  return dtypes


def trained_hf_tensors(config: ModelConfig, plan: TrainPlan, trainable, dtypes: Mapping[str, Any]
                       ) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, tensor) of every tensor an ESFT or FFT run changes, taken from the trained (fp32 master) tree
  and cast once to `dtypes[Flax path]`: ESFT's expert rows become the experts they were selected as."""
  trained = leaves_by_path(trainable)
  for entry in tensor_table(config):
    path = "/".join(entry.path)
    if path not in trained:
      continue
    array = np.asarray(jax.device_get(trained[path])).astype(dtypes[path])
    if entry.kind == "copy":
      yield entry.hf_names[0], array
    elif entry.kind == "linear":
      yield entry.hf_names[0], np.ascontiguousarray(array.T)
    else:
      experts = range(config.num_experts) if plan.trains_whole(path) else plan.experts.of_layer(layer_index(path))
      for row, e in enumerate(experts):
        yield entry.hf_names[e], np.ascontiguousarray(array[row].T)


def save_adapter(out_dir: str | Path, config: ModelConfig, params, plan: TrainPlan, trainable,
                 expert_config: dict | None = None, dtypes: Mapping[str, Any] | None = None) -> Path:
  """Writes the adapter of a run; `trainable` is the trained tree. ESFT and FFT adapters store each trained
  tensor in `dtypes[Flax path]`: pass `checkpoint_dtypes(model_dir, config)` to store them as the base checkpoint
  does (an fp32 base gets an fp32 adapter, whatever dtype training computed in); without it, in the dtypes of
  `params` (the frozen parameters, or a tree of jax.ShapeDtypeStruct: only their dtypes are read). LoRA factors
  are stored as trained (fp32)."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  if plan.method == "lora":
    _save_lora(out_dir, config, trainable, plan)
    return out_dir
  dtypes = dtypes or {path: leaf.dtype for path, leaf in leaves_by_path(params).items()}
  write_safetensors(out_dir / ADAPTER_FILE, dict(trained_hf_tensors(config, plan, trainable, dtypes)))
  if plan.method == "esft":
    cfg = expert_config or {"experts": {str(l): list(ids) for l, ids in plan.experts.layers},
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
  written = set()
  for path, leaf in leaves_by_path(factors).items():
    kernel_path, which = path.rsplit("/", 1)
    letter = "A" if which == "lora_a" else "B"
    array = np.asarray(jax.device_get(leaf))
    for i, module in enumerate(modules[kernel_path]):
      per_module = array[i] if array.ndim == 3 else array
      tensors[f"{PEFT_PREFIX}{module}.lora_{letter}.weight"] = np.ascontiguousarray(per_module.T)
      written.add(module.rsplit(".", 1)[-1])
  write_safetensors(out_dir / LORA_FILE, tensors)
  _write_json(out_dir / LORA_CONFIG_FILE, {
      "peft_type": "LORA", "r": plan.lora_rank, "lora_alpha": plan.lora_scale * plan.lora_rank,
      "lora_dropout": 0.0, "bias": "none", "target_modules": sorted(written), "task_type": "CAUSAL_LM"})


# PEFT settings that change what the factors mean; esft-jax merges plain LoRA (W + alpha/r * B A) only.
_UNSUPPORTED_LORA_SETTINGS = ("use_dora", "lora_bias", "fan_in_fan_out")


def _lora_scaling(settings: dict, config_path: Path) -> Callable[[str, int], float]:
  """(PEFT's name of the adapted module or parameter, rank found in the file) -> alpha / r (alpha / sqrt(r) with
  rsLoRA), with r and alpha from `rank_pattern` and `alpha_pattern` where a pattern matches the name as PEFT
  matches it. PEFT writes such patterns itself when it fuses LoRA targets (gate_proj and up_proj of transformers'
  fused experts get rank 2r and alpha 2 alpha)."""
  for key in _UNSUPPORTED_LORA_SETTINGS:
    if settings.get(key):
      raise ValueError(f"{config_path}: {key}={settings[key]!r} is not supported; esft-jax merges plain LoRA "
                       "factors")
  try:
    rank, alpha = settings["r"], settings["lora_alpha"]
  except KeyError as e:
    raise ValueError(f"{config_path}: no {e.args[0]!r}; a PEFT LoRA config holds r and lora_alpha") from None

  def pattern_value(patterns: dict | None, name: str, default):
    for pattern, value in (patterns or {}).items():
      if re.match(rf"(.*\.)?({pattern})$", name):
        return value
    return default

  def scaling(name: str, found_rank: int) -> float:
    module_rank = pattern_value(settings.get("rank_pattern"), name, rank)
    if module_rank != found_rank:
      raise ValueError(f"{config_path}: {name} has rank {found_rank} in {LORA_FILE} but {module_rank} by this "
                       "config (r, rank_pattern)")
    module_alpha = pattern_value(settings.get("alpha_pattern"), name, alpha)
    return module_alpha / math.sqrt(module_rank) if settings.get("use_rslora") else module_alpha / module_rank

  return scaling


def _peft_modules(reader: SafetensorsFile) -> dict[str, dict[str, str]]:
  """PEFT module name -> {"A": tensor name, "B": tensor name}; any other tensor is an error."""
  modules: dict[str, dict[str, str]] = {}
  strays = []
  for key in reader.keys():
    body = key.removeprefix(PEFT_PREFIX)
    module, _, suffix = body.rpartition(".lora_")
    if body == key or suffix not in ("A.weight", "B.weight"):
      strays.append(key)
      continue
    modules.setdefault(module, {})[suffix[0]] = key
  if strays:
    raise KeyError(f"{reader.path}: {len(strays)} tensors are not LoRA factors ({_listing(strays)}); esft-jax "
                   f"reads {PEFT_PREFIX}<module>.lora_A.weight and .lora_B.weight only (no DoRA magnitudes, "
                   "biases, embeddings or modules_to_save)")
  for module, pair in modules.items():
    if len(pair) != 2:
      raise KeyError(f"{reader.path}: module {module!r} has lora_{next(iter(pair))} but no "
                     f"lora_{'B' if 'A' in pair else 'A'}")
  return modules


def _listing(names: list[str], shown: int = 4) -> str:
  return ", ".join(repr(n) for n in names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _fused_expert_factors(a: np.ndarray, b: np.ndarray, stack_path: str, params, num_experts: int, where: str
                          ) -> tuple[str, int, dict[str, tuple[np.ndarray, np.ndarray]]]:
  """Flax factors from PEFT's `target_parameters` wrapper of transformers' fused experts.

  The wrapper holds lora_A [r*E, in] (expert e's rows e*r..(e+1)*r) and lora_B [out, r*E] (expert e's columns
  e, E+e, ...), adapting `gate_up_proj` [E, 2F, D] (gate rows first) or `down_proj` [E, D, F]. Which one a pair
  adapts is read from its shapes, since PEFT nests the wrappers of one module (`experts.lora_*`,
  `experts.base_layer.lora_*`) in an order its file does not record. Returns (the parameter's name, r,
  {Flax stack path: (A [E, in, r], B [E, r, out])})."""
  hidden, width = get_path(params, f"{stack_path}/gate_proj").shape[1:]
  rank_total, fan_in = a.shape
  fan_out = b.shape[0]
  if rank_total % num_experts or b.shape[1] != rank_total:
    raise ValueError(f"{where}: lora_A {a.shape} and lora_B {b.shape} are not PEFT's fused-expert factors for "
                     f"{num_experts} experts (rank times experts on the shared axis)")
  rank = rank_total // num_experts
  lora_a = a.reshape(num_experts, rank, fan_in).transpose(0, 2, 1)
  lora_b = b.reshape(fan_out, rank, num_experts).transpose(2, 1, 0)
  if (fan_in, fan_out) == (hidden, 2 * width):
    return "gate_up_proj", rank, {f"{stack_path}/gate_proj": (lora_a, lora_b[..., :width]),
                                  f"{stack_path}/up_proj": (lora_a, lora_b[..., width:])}
  if (fan_in, fan_out) == (width, hidden):
    return "down_proj", rank, {f"{stack_path}/down_proj": (lora_a, lora_b)}
  raise ValueError(f"{where}: lora_A {a.shape} and lora_B {b.shape} fit neither gate_up_proj [{num_experts}, "
                   f"{2 * width}, {hidden}] nor down_proj [{num_experts}, {hidden}, {width}]")


def _lora_sites(config: ModelConfig) -> dict[str, tuple[str, int | None]]:
  """PEFT module name -> (Flax kernel path, expert index or None), for every linear layer and routed expert, under
  the checkpoint's names and (Mixtral) transformers' in-memory ones."""
  sites = {}
  for entry in tensor_table(config):
    if entry.kind in ("linear", "experts"):
      for e, name in enumerate(entry.hf_names):
        module, site = name.removesuffix(".weight"), ("/".join(entry.path), e if entry.kind == "experts" else None)
        sites[module] = sites[module.replace(".block_sparse_moe.", ".mlp.")] = site
  return sites


def _load_lora(adapter_dir: Path, config: ModelConfig, params) -> dict:
  """The base parameters with a PEFT LoRA adapter merged in. Every factor must map to a weight: per module
  (linear layers, and routed experts by index as transformers 4 names them) or per fused expert tensor
  (transformers 5's `mlp.experts.gate_up_proj` / `down_proj`, PEFT's `target_parameters`)."""
  config_path = adapter_dir / LORA_CONFIG_FILE
  try:
    scaling = _lora_scaling(json.loads(config_path.read_text()), config_path)
  except json.JSONDecodeError as e:
    raise ValueError(f"{config_path}: not valid JSON ({e.msg})") from None
  reader = SafetensorsFile(adapter_dir / LORA_FILE)
  sites = _lora_sites(config)
  fused_sites = {f"model.layers.{layer}.mlp.experts": f"layers_{layer}/mlp/experts" for layer in config.moe_layer_ids}
  factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # Flax kernel path -> (A [.., in, r], scaled B [.., r, out])
  per_expert: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
  unmapped = []

  def put(kernel_path: str, pair: tuple[np.ndarray, np.ndarray], module: str) -> None:
    if kernel_path in factors:
      raise ValueError(f"{reader.path}: {kernel_path} is adapted twice (again by {module!r}); keep one layout")
    factors[kernel_path] = pair

  for module, pair in sorted(_peft_modules(reader).items()):
    a, b = (np.asarray(reader.get(pair[k]), np.float32) for k in "AB")
    stem = module
    while stem.endswith(".base_layer"):
      stem = stem.removesuffix(".base_layer")
    if stem in fused_sites:
      name, rank, fused = _fused_expert_factors(a, b, fused_sites[stem], params, config.num_experts,
                                                f"{reader.path}: {module}")
      scale = scaling(f"{stem}.{name}", rank)
      for kernel_path, (lora_a, lora_b) in fused.items():
        put(kernel_path, (lora_a, lora_b * scale), module)
      continue
    if module not in sites:
      unmapped.append(module)
      continue
    kernel_path, expert = sites[module]
    fan_in, fan_out = get_path(params, kernel_path).shape[-2:]
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or (a.shape[1], b.shape[0]) != (fan_in, fan_out):
      raise ValueError(f"{reader.path}: {module} has lora_A {a.shape} and lora_B {b.shape}, which do not fit "
                       f"its weight [out {fan_out}, in {fan_in}]")
    pair = (a.T, b.T * scaling(module, a.shape[0]))
    if expert is None:
      put(kernel_path, pair, module)
    else:
      per_expert.setdefault(kernel_path, {})[expert] = pair
  if unmapped:
    raise KeyError(f"{reader.path}: LoRA factors of {len(unmapped)} modules map to no weight of this "
                   f"{config.model_type} model: {_listing(unmapped)}; was the adapter made for another base?")
  for kernel_path, experts in per_expert.items():
    _, fan_in, fan_out = get_path(params, kernel_path).shape
    rank = next(iter(experts.values()))[0].shape[1]
    stack_a = np.zeros((config.num_experts, fan_in, rank), np.float32)
    stack_b = np.zeros((config.num_experts, rank, fan_out), np.float32)
    for e, (lora_a, lora_b) in experts.items():  # experts without factors keep their weights (zero factors)
      stack_a[e], stack_b[e] = lora_a, lora_b  # one r for all: `scaling` checked each against the config
    put(kernel_path, (stack_a, stack_b), f"{kernel_path} per expert")
  tree: dict = {}
  for kernel_path, (lora_a, lora_b) in factors.items():
    set_path(tree, f"{kernel_path}/lora_a", jnp.asarray(lora_a))
    set_path(tree, f"{kernel_path}/lora_b", jnp.asarray(lora_b))
  return apply_lora(params, tree, 1.0)  # each B carries its module's alpha / r
