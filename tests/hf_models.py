"""Tiny random transformers models of every supported architecture, built offline from config objects.

The configs are deliberately non-trivial: YaRN on DeepSeek-V2, q_lora and group-limited routing with a
score-correction bias on V3, norms away from 1.0, routers with spread-out logits, shared-expert gates, q/k
norms, sliding windows, untied heads.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

VOCAB = 96

ARCHITECTURES = {
    "deepseek_v2": lambda: transformers.DeepseekV2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3,
        kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10,
        first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=1.5, max_position_embeddings=256,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                         "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
                         "mscale": 0.707, "mscale_all_dim": 0.707},
        rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "deepseek_v2_group": lambda: transformers.DeepseekV2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=12,
        first_k_dense_replace=0, topk_method="group_limited_greedy", n_group=4, topk_group=2,
        bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
        kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10,
        first_k_dense_replace=1, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
                         "mscale": 1.0, "mscale_all_dim": 1.0},
        bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
        shared_expert_intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        num_experts=8, num_experts_per_tok=2, mlp_only_layers=[1], norm_topk_prob=False,
        output_router_logits=True, router_aux_loss_coef=0.01, rope_theta=1000.0, bos_token_id=1, eos_token_id=2),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, num_experts=8, num_experts_per_tok=3,
        norm_topk_prob=True, output_router_logits=True, router_aux_loss_coef=0.01, bos_token_id=1,
        eos_token_id=2),
    "olmoe": lambda: transformers.OlmoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, clip_qkv=3.0, output_router_logits=True,
        router_aux_loss_coef=0.01, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "mixtral": lambda: transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2, sliding_window=5,
        output_router_logits=True, router_aux_loss_coef=0.02, bos_token_id=1, eos_token_id=2),
}


def build_hf_model(name: str, seed: int = 0) -> transformers.PreTrainedModel:
  """A random fp32 transformers model with norms, router weights and biases moved off their defaults."""
  torch.manual_seed(seed)
  config = ARCHITECTURES[name]()
  config._attn_implementation = "eager"
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
  with torch.no_grad():
    for param_name, param in model.named_parameters():
      if param_name.endswith("norm.weight") or "layernorm" in param_name:
        param.copy_(1.0 + 0.2 * torch.randn_like(param))
      elif param_name.endswith("gate.weight"):  # spread-out router logits
        param.copy_(0.5 * torch.randn_like(param))
      elif param_name.endswith(".bias"):
        param.copy_(0.1 * torch.randn_like(param))
    for module in model.modules():
      if hasattr(module, "e_score_correction_bias"):
        module.e_score_correction_bias.copy_(0.05 * torch.randn_like(module.e_score_correction_bias))
  return model


def save_hf_model_dir(name: str, directory: Path, seed: int = 0) -> transformers.PreTrainedModel:
  model = build_hf_model(name, seed)
  model.save_pretrained(directory)
  return model


def capture_routing(model: transformers.PreTrainedModel) -> tuple[list, list]:
  """Registers hooks on every router; returns (records, handles). Each record is (weights, ids) [T, K]."""
  records, handles = [], []
  for module in model.modules():
    if type(module).__name__.endswith("Router"):
      handles.append(module.register_forward_hook(lambda m, i, out: records.append((out[1], out[2]))))
  return records, handles
