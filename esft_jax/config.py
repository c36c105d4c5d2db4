"""Model configuration: one frozen dataclass for the whole MoE family, read from a Hugging Face `config.json`.

The dataclass is hashable so it can be a static argument of `jax.jit`. Each supported `model_type` has one
reader below that maps its HF fields onto the shared fields; everything downstream sees only `ModelConfig`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "qwen2_moe", "qwen3_moe", "olmoe", "mixtral")
PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "models"


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  theta: float = 10000.0
  kind: str = "default"  # "default" | "yarn"
  interleaved: bool = False  # DeepSeek pairs (x0, x1), (x2, x3), ... instead of rotating halves
  factor: float = 1.0
  original_max_position: int = 4096
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float | None = None
  mscale_all_dim: float | None = None
  attention_factor: float | None = None
  truncate: bool = True


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  model_type: str
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int  # width of the dense MLP layers
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  rope: RopeConfig = RopeConfig()
  # Attention: "gqa" (MHA/GQA, optional q/k norm) or "mla" (DeepSeek multi-head latent attention).
  attention: str = "gqa"
  qkv_bias: bool = False
  o_bias: bool = False
  qk_norm: str | None = None  # None | "head" (Qwen3: per head) | "full" (OLMoE: over the whole projection)
  clip_qkv: float | None = None
  sliding_windows: tuple[int | None, ...] = ()  # per layer; empty = full causal everywhere
  q_lora_rank: int | None = None
  kv_lora_rank: int = 0
  qk_nope_head_dim: int = 0
  qk_rope_head_dim: int = 0
  v_head_dim: int = 0
  mla_bias: bool = False  # DeepSeek's attention_bias: q_a_proj, kv_a_proj_with_mqa, o_proj
  # MoE.
  moe_layers: tuple[bool, ...] = ()  # per layer: MoE (True) or dense MLP (False)
  num_experts: int = 0
  num_experts_per_tok: int = 0
  moe_intermediate_size: int = 0
  shared_intermediate_size: int = 0  # fused width of all shared experts; 0 = none
  shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(x @ w) scales the shared expert
  scoring_func: str = "softmax"  # "softmax" | "sigmoid"
  topk_method: str = "greedy"  # "greedy" | "group_limited_greedy" (V2) | "noaux_tc" (V3, bias + groups)
  n_group: int = 1
  topk_group: int = 1
  norm_topk_prob: bool = False
  routed_scaling_factor: float = 1.0
  # Coarse experts made of G fine ones (the paper's granularity ablation): the router scores G * num_experts fine
  # experts, each expert's gate is the mean of its G consecutive fine probabilities. 1 = an ordinary router.
  router_group_size: int = 1
  # Load balancing: "seq" (DeepSeek's sequence-level aux loss), "batch" (DeepSeek without seq_aux),
  # "global" (Mixtral/OLMoE/Qwen over all layers and tokens), or None.
  aux_loss_kind: str | None = None
  aux_loss_coef: float = 0.0
  bos_token_id: int | None = None
  eos_token_id: int | None = None

  def __post_init__(self):
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"model_type {self.model_type!r} is not supported; use one of {SUPPORTED_MODEL_TYPES}")
    if len(self.moe_layers) != self.num_layers:
      raise ValueError(f"moe_layers has {len(self.moe_layers)} entries for {self.num_layers} layers")
    if self.num_experts and self.num_experts % self.n_group:
      raise ValueError(f"n_routed_experts={self.num_experts} is not divisible by n_group={self.n_group}")
    _check_group_size(self.router_group_size)
    if self.router_group_size > 1 and self.topk_method != "greedy":
      raise ValueError(f"router_group_size={self.router_group_size} needs topk_method 'greedy', not "
                       f"{self.topk_method!r}: grouped routing has no expert groups of its own")

  @property
  def moe_layer_ids(self) -> tuple[int, ...]:
    return tuple(i for i, is_moe in enumerate(self.moe_layers) if is_moe)

  @property
  def rope_dim(self) -> int:
    return self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

  def sliding_window(self, layer: int) -> int | None:
    return self.sliding_windows[layer] if self.sliding_windows else None

  def softmax_scale(self) -> float:
    """1/sqrt(d_qk), times YaRN's mscale² for MLA (DeepSeek's long-context attention temperature)."""
    qk_dim = self.qk_nope_head_dim + self.qk_rope_head_dim if self.attention == "mla" else self.head_dim
    scale = qk_dim**-0.5
    if self.attention == "mla" and self.rope.kind == "yarn" and self.rope.mscale_all_dim:
      m = yarn_mscale(self.rope.factor, self.rope.mscale_all_dim)
      scale *= m * m
    return scale


def _check_group_size(size: Any) -> None:
  if isinstance(size, bool) or not isinstance(size, int) or size < 1:
    raise ValueError(f"router_group_size={size!r} must be a positive integer (1: no grouping)")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _rope_from_hf(hf: dict[str, Any], interleaved: bool) -> RopeConfig:
  # transformers >= 5 writes `rope_parameters`; older checkpoints (DeepSeek-V2-Lite's own) write `rope_scaling`.
  params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  kind = params.get("rope_type", params.get("type", "default")) or "default"
  if kind not in ("default", "yarn"):
    raise ValueError(f"config.json: rope type {kind!r} is not supported (use 'default' or 'yarn')")
  if kind == "default":
    return RopeConfig(theta=float(theta), interleaved=interleaved)
  return RopeConfig(
      theta=float(theta), kind="yarn", interleaved=interleaved,
      factor=float(params.get("factor") or hf["max_position_embeddings"] / params["original_max_position_embeddings"]),
      original_max_position=int(params.get("original_max_position_embeddings", hf.get("max_position_embeddings"))),
      beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
      mscale=params.get("mscale"), mscale_all_dim=params.get("mscale_all_dim"),
      attention_factor=params.get("attention_factor"), truncate=bool(params.get("truncate", True)))


def _field(hf: dict[str, Any], *names: str):
  """The first of `names` present (transformers renamed some fields between releases)."""
  for name in names:
    if name in hf:
      return hf[name]
  raise KeyError(" or ".join(names))


def _first_id(value):
  return value[0] if isinstance(value, list) else value


def _common(hf: dict[str, Any]) -> dict[str, Any]:
  num_heads = hf["num_attention_heads"]
  common = dict(
      model_type=hf["model_type"], vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
      num_layers=hf["num_hidden_layers"], num_heads=num_heads,
      num_kv_heads=hf.get("num_key_value_heads") or num_heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
      intermediate_size=hf["intermediate_size"], rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      bos_token_id=_first_id(hf.get("bos_token_id")), eos_token_id=_first_id(hf.get("eos_token_id")),
      router_group_size=hf.get("router_group_size", 1))
  _check_group_size(common["router_group_size"])  # before a reader divides by it
  return common


def _deepseek(hf: dict[str, Any]) -> ModelConfig:
  v3 = hf["model_type"] == "deepseek_v3"
  n_layers = hf["num_hidden_layers"]
  freq = hf.get("moe_layer_freq", 1)
  first_dense = hf.get("first_k_dense_replace", 0)
  n_experts = hf["n_routed_experts"]
  moe_layers = tuple(bool(n_experts) and i >= first_dense and i % freq == 0 for i in range(n_layers))
  # transformers scores V2 with softmax and V3 with sigmoid whatever `scoring_func` says; we match it.
  topk_method, scoring = ("noaux_tc", "sigmoid") if v3 else (hf.get("topk_method") or "greedy", "softmax")
  if topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
    raise ValueError(f"config.json: topk_method {topk_method!r} is not supported")
  common = _common(hf)
  common["head_dim"] = hf["qk_rope_head_dim"]
  seq_aux = hf.get("seq_aux", True)
  return ModelConfig(
      **common, rope=_rope_from_hf(hf, interleaved=hf.get("rope_interleave", True) if v3 else True),
      attention="mla", q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
      qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
      v_head_dim=hf["v_head_dim"], mla_bias=bool(hf.get("attention_bias", False)),
      moe_layers=moe_layers, num_experts=n_experts, num_experts_per_tok=hf["num_experts_per_tok"],
      moe_intermediate_size=hf["moe_intermediate_size"],
      # DeepSeek counts shared experts in routed-expert widths; a grouped model's unit is its fine expert.
      shared_intermediate_size=hf["moe_intermediate_size"] // common["router_group_size"]
      * (hf.get("n_shared_experts") or 0),
      scoring_func=scoring, topk_method=topk_method, n_group=hf.get("n_group") or 1,
      topk_group=hf.get("topk_group") or 1,
      # transformers' DeepseekV2 router never renormalises top-k weights, whatever norm_topk_prob says; we match it.
      norm_topk_prob=bool(hf.get("norm_topk_prob", False)) if v3 else False,
      routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
      aux_loss_kind=("seq" if seq_aux else "batch") if hf.get("aux_loss_alpha", 0.0) else None,
      aux_loss_coef=float(hf.get("aux_loss_alpha", 0.0)))


def _qwen_moe(hf: dict[str, Any]) -> ModelConfig:
  n_layers = hf["num_hidden_layers"]
  step = hf.get("decoder_sparse_step", 1)
  dense_only = set(hf.get("mlp_only_layers") or [])
  n_experts = _field(hf, "num_experts", "num_local_experts")
  moe_layers = tuple(i not in dense_only and n_experts > 0 and (i + 1) % step == 0 for i in range(n_layers))
  qwen2 = hf["model_type"] == "qwen2_moe"
  windows: tuple[int | None, ...] = ()
  if hf.get("use_sliding_window") and hf.get("sliding_window"):
    types = hf.get("layer_types") or ["sliding_attention"] * n_layers
    windows = tuple(hf["sliding_window"] if t == "sliding_attention" else None for t in types)
  return ModelConfig(
      **_common(hf), rope=_rope_from_hf(hf, interleaved=False), attention="gqa",
      qkv_bias=bool(hf.get("qkv_bias", True)) if qwen2 else bool(hf.get("attention_bias", False)),
      o_bias=False if qwen2 else bool(hf.get("attention_bias", False)),
      qk_norm=None if qwen2 else "head", sliding_windows=windows,
      moe_layers=moe_layers, num_experts=n_experts, num_experts_per_tok=hf["num_experts_per_tok"],
      moe_intermediate_size=hf["moe_intermediate_size"],
      shared_intermediate_size=hf.get("shared_expert_intermediate_size", 0) if qwen2 else 0,
      shared_expert_gate=qwen2, norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
      aux_loss_kind="global" if hf.get("output_router_logits") else None,
      aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.0)))


def _olmoe_or_mixtral(hf: dict[str, Any]) -> ModelConfig:
  olmoe = hf["model_type"] == "olmoe"
  n_experts = _field(hf, "num_experts", "num_local_experts")
  window = None if olmoe else hf.get("sliding_window")
  n_layers = hf["num_hidden_layers"]
  return ModelConfig(
      **_common(hf), rope=_rope_from_hf(hf, interleaved=False), attention="gqa",
      qkv_bias=olmoe and bool(hf.get("attention_bias", False)), o_bias=olmoe and bool(hf.get("attention_bias", False)),
      qk_norm="full" if olmoe else None, clip_qkv=hf.get("clip_qkv") if olmoe else None,
      sliding_windows=(window,) * n_layers if window else (),
      moe_layers=(True,) * n_layers, num_experts=n_experts, num_experts_per_tok=hf["num_experts_per_tok"],
      moe_intermediate_size=hf["intermediate_size"],
      norm_topk_prob=bool(hf.get("norm_topk_prob", False)) if olmoe else True,
      aux_loss_kind="global" if hf.get("output_router_logits") else None,
      aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.0)))


_READERS = {"deepseek_v2": _deepseek, "deepseek_v3": _deepseek, "qwen2_moe": _qwen_moe, "qwen3_moe": _qwen_moe,
            "olmoe": _olmoe_or_mixtral, "mixtral": _olmoe_or_mixtral}


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
  """Maps a Hugging Face config dict onto `ModelConfig`; `source` names the file in error messages."""
  model_type = hf.get("model_type")
  if model_type not in _READERS:
    raise ValueError(f"{source}: model_type {model_type!r} is not supported; "
                     f"esft-jax reads {', '.join(SUPPORTED_MODEL_TYPES)}")
  try:
    return _READERS[model_type](hf)
  except KeyError as e:
    raise ValueError(f"{source}: field {e.args[0]!r} is required for model_type {model_type!r}") from None


def read_hf_config(path: str | Path) -> dict[str, Any]:
  """Reads `config.json` from a model directory, or a preset name from configs/models/."""
  path = Path(path)
  file = path / "config.json" if path.is_dir() else path
  if not file.exists() and not path.suffix:
    preset = PRESET_DIR / f"{path.name}.json"
    if preset.exists():
      file = preset
  if not file.exists():
    presets = sorted(p.stem for p in PRESET_DIR.glob("*.json"))
    raise FileNotFoundError(f"{file}: no config.json here; pass a Hugging Face model directory or one of the "
                            f"presets {presets}")
  try:
    return json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{file}: not valid JSON ({e})") from None


def load_config(path: str | Path) -> ModelConfig:
  hf = read_hf_config(path)
  return config_from_hf(hf, str(path))
