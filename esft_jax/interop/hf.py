"""Hugging Face model directories in and out: one name table per architecture, one loader, one writer.

`tensor_table(config)` lists every parameter of the Flax tree with the HF tensor name(s) it comes from and how
to convert it. Loading reads each tensor lazily (memory-mapped) and converts it on its own, so a 16B checkpoint
never needs twice its size in host memory. Writing produces the per-expert layout transformers writes, so the
result loads with `from_pretrained` and round-trips bit-exactly.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from esft_jax.config import ModelConfig, config_from_hf, read_hf_config
from esft_jax.files import atomic_write_text
from esft_jax.interop import fp8
from esft_jax.interop.safetensors_io import CheckpointReader, write_checkpoint
from esft_jax.paths import get_path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One parameter: its path in the Flax tree, the HF tensor name(s), and the conversion kind.

  kind: "linear" (HF [out, in] <-> Flax [in, out]); "copy" (norms, biases, embeddings);
  "experts" (E per-expert HF tensors [out, in] <-> one stacked Flax [E, in, out]).
  """
  path: tuple[str, ...]
  hf_names: tuple[str, ...]
  kind: str


def _moe_names(cfg: ModelConfig) -> tuple[str, dict[str, str], str | None]:
  """(module prefix, {flax expert proj: HF proj}, shared-experts prefix) for the architecture's MoE layers."""
  if cfg.model_type == "mixtral":
    return "block_sparse_moe", {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}, None
  shared = {"qwen2_moe": "shared_expert", "deepseek_v2": "shared_experts", "deepseek_v3": "shared_experts"}
  projs = {p: p for p in ("gate_proj", "up_proj", "down_proj")}
  return "mlp", projs, shared.get(cfg.model_type)


def _attention_entries(cfg: ModelConfig, layer: int) -> Iterator[Entry]:
  flax, hf = (f"layers_{layer}", "self_attn"), f"model.layers.{layer}.self_attn"

  def linear(name, bias=False):
    yield Entry((*flax, name, "kernel"), (f"{hf}.{name}.weight",), "linear")
    if bias:
      yield Entry((*flax, name, "bias"), (f"{hf}.{name}.bias",), "copy")

  def norm(name):
    yield Entry((*flax, name, "scale"), (f"{hf}.{name}.weight",), "copy")

  if cfg.attention == "mla":
    if cfg.q_lora_rank is None:
      yield from linear("q_proj")
    else:
      yield from linear("q_a_proj", cfg.mla_bias)
      yield from norm("q_a_layernorm")
      yield from linear("q_b_proj")
    yield from linear("kv_a_proj_with_mqa", cfg.mla_bias)
    yield from norm("kv_a_layernorm")
    yield from linear("kv_b_proj")
    yield from linear("o_proj", cfg.mla_bias)
    return
  for name in ("q_proj", "k_proj", "v_proj"):
    yield from linear(name, cfg.qkv_bias)
  yield from linear("o_proj", cfg.o_bias)
  if cfg.qk_norm:
    yield from norm("q_norm")
    yield from norm("k_norm")


def _mlp_entries(cfg: ModelConfig, layer: int) -> Iterator[Entry]:
  flax, hf = (f"layers_{layer}", "mlp"), f"model.layers.{layer}"
  if not cfg.moe_layers[layer]:
    for p in ("gate_proj", "up_proj", "down_proj"):
      yield Entry((*flax, p, "kernel"), (f"{hf}.mlp.{p}.weight",), "linear")
    return
  prefix, projs, shared = _moe_names(cfg)
  yield Entry((*flax, "gate", "kernel"), (f"{hf}.{prefix}.gate.weight",), "linear")
  if cfg.topk_method == "noaux_tc":
    yield Entry((*flax, "e_score_correction_bias"), (f"{hf}.{prefix}.gate.e_score_correction_bias",), "copy")
  for p, hf_p in projs.items():
    names = tuple(f"{hf}.{prefix}.experts.{e}.{hf_p}.weight" for e in range(cfg.num_experts))
    yield Entry((*flax, "experts", p), names, "experts")
  if shared and cfg.shared_intermediate_size:  # DeepSeek's n_shared_experts may be 0
    for p in ("gate_proj", "up_proj", "down_proj"):
      yield Entry((*flax, "shared_experts", p, "kernel"), (f"{hf}.mlp.{shared}.{p}.weight",), "linear")
  if cfg.shared_expert_gate:
    yield Entry((*flax, "shared_expert_gate", "kernel"), (f"{hf}.mlp.shared_expert_gate.weight",), "linear")


def tensor_table(cfg: ModelConfig) -> list[Entry]:
  """Every parameter of the model with its HF name(s), in checkpoint order."""
  table = [Entry(("embed_tokens",), ("model.embed_tokens.weight",), "copy")]
  for layer in range(cfg.num_layers):
    table.append(Entry((f"layers_{layer}", "input_layernorm", "scale"),
                       (f"model.layers.{layer}.input_layernorm.weight",), "copy"))
    table.extend(_attention_entries(cfg, layer))
    table.append(Entry((f"layers_{layer}", "post_attention_layernorm", "scale"),
                       (f"model.layers.{layer}.post_attention_layernorm.weight",), "copy"))
    table.extend(_mlp_entries(cfg, layer))
  table.append(Entry(("norm", "scale"), ("model.norm.weight",), "copy"))
  if not cfg.tie_word_embeddings:
    table.append(Entry(("lm_head", "kernel"), ("lm_head.weight",), "linear"))
  return table


def expected_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  from esft_jax.model.transformer import init_params  # deferred: the model imports nothing from interop
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  return {tuple(k.key for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}


def _fused_experts(reader: CheckpointReader, names: tuple[str, ...], proj: str, shape: tuple[int, ...]) -> np.ndarray:
  """The same stacked tensor from transformers' fused in-memory layout (`experts.gate_up_proj` [E, 2F, D] with
  gate first, `experts.down_proj` [E, D, F]), for checkpoints saved that way."""
  prefix = names[0].rsplit(".experts.", 1)[0] + ".experts."
  e, a, b = shape
  if proj == "down_proj":
    return np.swapaxes(reader.get(prefix + "down_proj", (e, b, a)), 1, 2)
  fused = reader.get(prefix + "gate_up_proj", (e, 2 * b, a))
  half = fused[:, :b] if proj == "gate_proj" else fused[:, b:]
  return np.swapaxes(half, 1, 2)


def _read_entry(reader: CheckpointReader, entry: Entry, shape: tuple[int, ...]) -> np.ndarray:
  if entry.kind == "copy":
    return reader.get(entry.hf_names[0], shape)
  if entry.kind == "linear":
    return reader.get(entry.hf_names[0], shape[::-1]).T
  e, a, b = shape
  if entry.hf_names[0] not in reader:
    prefix = entry.hf_names[0].rsplit(".experts.", 1)[0] + ".experts."
    if prefix + "down_proj" in reader or prefix + "gate_up_proj" in reader:
      return _fused_experts(reader, entry.hf_names, entry.path[-1], shape)
  missing = [n for n in entry.hf_names if n not in reader]
  if missing:
    raise KeyError(f"{reader.dir}: expert tensor {missing[0]!r} is missing ({len(missing)} of {e} experts of "
                   f"this projection absent); the checkpoint is incomplete")
  out = np.empty(shape, dtype=reader.get(entry.hf_names[0]).dtype)
  for i, name in enumerate(entry.hf_names):
    out[i] = reader.get(name, (b, a)).T
  return out


def _non_finite_names(entry: Entry, array: np.ndarray) -> list[str]:
  """The HF names of `entry` whose values hold a NaN or an infinity (per expert for stacked experts). A float64
  sum is non-finite exactly when a value is (bf16 and fp32 magnitudes cannot overflow it), and it needs no
  temporary as large as the tensor."""
  if not jnp.issubdtype(array.dtype, jnp.floating):  # jnp's knows bfloat16; numpy's does not
    return []
  if entry.kind == "experts":
    sums = np.sum(array, axis=tuple(range(1, array.ndim)), dtype=np.float64)
    return [name for name, total in zip(entry.hf_names, sums) if not np.isfinite(total)]
  return [] if np.isfinite(np.sum(array, dtype=np.float64)) else [entry.hf_names[0]]


def _few(names: list[str], n: int = 5) -> str:
  return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


# Tensors a checkpoint may hold that the model rightly never reads:
# - rotary inverse frequencies, a buffer some transformers versions save, recomputed from config.json;
# - DeepSeek-V3's multi-token-prediction module, stored as layers num_hidden_layers and up
#   (num_nextn_predict_layers of them), which transformers also leaves out of the model;
# - an lm_head stored beside tied embeddings, which transformers replaces by the embedding as well.
_ROTARY_BUFFER = ".rotary_emb.inv_freq"


def _legitimately_unused(name: str, config: ModelConfig, hf_config: dict) -> bool:
  if name.endswith(_ROTARY_BUFFER):
    return True
  mtp_layers = range(config.num_layers, config.num_layers + int(hf_config.get("num_nextn_predict_layers") or 0))
  if any(name.startswith(f"model.layers.{layer}.") for layer in mtp_layers):
    return True
  return name == "lm_head.weight" and config.tie_word_embeddings


def _check_unused_tensors(reader: CheckpointReader, config: ModelConfig, hf_config: dict,
                          table: list[Entry]) -> None:
  """Every tensor of the checkpoint must be read, except the legitimately unused ones above: a config.json that
  declares fewer layers or experts than the checkpoint holds would otherwise load a different, smaller model
  without a word."""
  used = {name for entry in table for name in entry.hf_names}
  used |= {fp8.scale_name(name) for name in used}  # FP8 block scales, read with their weights (interop/fp8.py)
  used |= {entry.hf_names[0].rsplit(".experts.", 1)[0] + f".experts.{fused}"
           for entry in table if entry.kind == "experts" for fused in ("gate_up_proj", "down_proj")}
  unused = sorted((k for k in reader.keys() if k not in used and not _legitimately_unused(k, config, hf_config)),
                  key=_natural_key)
  if not unused:
    return
  layers = [int(k.split(".")[2]) for k in unused if k.startswith("model.layers.") and k.split(".")[2].isdigit()]
  hint = (f"the checkpoint holds layers up to {max(layers)} but config.json declares num_hidden_layers="
          f"{config.num_layers}; " if layers and max(layers) >= config.num_layers else "")
  raise ValueError(f"{reader.dir}: {len(unused)} tensors of the checkpoint are not used by its config.json: "
                   f"{_few(unused)}. {hint}Make config.json describe the checkpoint (num_hidden_layers, the "
                   "number of experts, the attention and MoE options), or remove those tensors from the "
                   "safetensors files")


def _natural_key(name: str) -> list:
  """Sorts model.layers.2 before model.layers.10."""
  return [int(part) if part.isdigit() else part for part in name.split(".")]


def _is_router(path: tuple[str, ...]) -> bool:
  return path[-2:] == ("gate", "kernel") or path[-1] == "e_score_correction_bias"


@dataclasses.dataclass
class LoadedModel:
  config: ModelConfig
  params: Any  # the Flax parameter pytree (jax arrays)
  hf_config: dict[str, Any]  # config.json as read, written back unchanged on save
  path: Path


def load_hf_model(model_dir: str | Path, dtype: Any = None, shardings: Any = None,
                  check_finite: bool = False) -> LoadedModel:
  """Reads an HF model directory. `dtype` casts every parameter except the router (kept fp32, as transformers
  keeps it); None keeps the checkpoint's dtypes exactly (the router still computes in fp32), except that FP8
  block-scaled weights (DeepSeek-V3's release, `esft_jax.interop.fp8`) are dequantized to bf16. `shardings` (a tree
  like `esft_jax.sharding.param_shardings`) puts each tensor straight onto its devices, each receiving only its
  own shard: no device ever holds the whole model, and on several hosts each process fills only its devices.
  A checkpoint tensor the config does not use is an error (`_check_unused_tensors`). `check_finite` also
  refuses a checkpoint holding a NaN or an infinity, naming the tensors (one more pass over the host copy of
  each tensor)."""
  model_dir = Path(model_dir)
  hf_config = read_hf_config(model_dir)
  config = config_from_hf(hf_config, str(model_dir / "config.json"))
  reader = CheckpointReader(model_dir)
  block = fp8.weight_block_size(hf_config, reader, model_dir / "config.json")
  if block is not None:  # the weights come out dequantized: a model written back from them is not FP8
    hf_config = {k: v for k, v in hf_config.items() if k != "quantization_config"}
  table = tensor_table(config)
  _check_unused_tensors(reader, config, hf_config, table)
  shapes = expected_shapes(config)
  params: dict = {}
  non_finite: list[str] = []
  for entry in table:
    # FP8 weights come as lazy views that dequantize only the slice each device receives.
    array = fp8.dequantized_entry(reader, entry.hf_names, entry.kind, shapes[entry.path], block)
    if array is None:
      array = _read_entry(reader, entry, shapes[entry.path])
      fp8.refuse_unscaled(array, reader, entry.hf_names[0])
    if check_finite:
      non_finite += _non_finite_names(entry, array)
    target = jnp.float32 if dtype is not None and _is_router(entry.path) else dtype
    node = params
    for key in entry.path[:-1]:
      node = node.setdefault(key, {})
    host = array.astype(target or array.dtype, copy=False)
    if shardings is None:
      node[entry.path[-1]] = jnp.asarray(host)
    else:
      node[entry.path[-1]] = jax.make_array_from_callback(host.shape, get_path(shardings, "/".join(entry.path)),
                                                          lambda index, host=host: host[index])
  if non_finite:
    which = "1 tensor holds" if len(non_finite) == 1 else f"{len(non_finite)} tensors hold"
    raise ValueError(f"{model_dir}: {which} NaN or infinite values: {_few(non_finite)}; "
                     "the checkpoint is damaged or was saved from a diverged run: use another checkpoint "
                     "(--no-check-weights skips this check)")
  return LoadedModel(config, params, hf_config, model_dir)


def hf_tensors(config: ModelConfig, params: Any, dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
  """The HF tensors of a parameter tree, in the per-expert layout transformers writes."""
  for entry in tensor_table(config):
    value = params
    for key in entry.path:
      value = value[key]
    array = np.asarray(jax.device_get(value))
    if dtype is not None and not _is_router(entry.path):
      array = array.astype(dtype)
    if entry.kind == "copy":
      yield entry.hf_names[0], array
    elif entry.kind == "linear":
      yield entry.hf_names[0], np.ascontiguousarray(array.T)
    else:
      for i, name in enumerate(entry.hf_names):
        yield name, np.ascontiguousarray(array[i].T)


def save_hf_model(out_dir: str | Path, config: ModelConfig, params: Any, hf_config: dict[str, Any],
                  tokenizer_dir: str | Path | None = None, dtype: Any = None,
                  max_shard_bytes: int = 5 * 2**30) -> Path:
  """Writes config.json, safetensors (sharded above `max_shard_bytes`) and the tokenizer files of
  `tokenizer_dir`. Each file is written under a temporary name and renamed."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  write_checkpoint(out_dir, hf_tensors(config, params, dtype), max_shard_bytes)
  atomic_write_text(out_dir / "config.json", json.dumps(hf_config, indent=2, sort_keys=True))
  if tokenizer_dir is not None and Path(tokenizer_dir).resolve() != out_dir.resolve():
    for name in TOKENIZER_FILES:
      if (Path(tokenizer_dir) / name).exists():
        shutil.copyfile(Path(tokenizer_dir) / name, out_dir / name)
  return out_dir

