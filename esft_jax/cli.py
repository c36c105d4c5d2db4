"""The `esft-jax` command line: one subcommand per step of the ESFT workflow."""

from __future__ import annotations

import argparse
import sys
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
  import jax
  import jax.numpy as jnp

  from esft_jax.config import config_from_hf, read_hf_config
  from esft_jax.interop.hf import save_hf_model
  from esft_jax.model.transformer import init_params

  hf_config = read_hf_config(args.model)
  cfg = config_from_hf(hf_config, str(args.model))
  params = init_params(cfg, jax.random.key(args.seed), param_dtype=jnp.dtype(args.dtype))
  save_hf_model(args.out, cfg, params, hf_config)
  print(f"wrote a random-weight {cfg.model_type} model to {args.out}")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="esft-jax", description=DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

  info = sub.add_parser("info", help="architecture and parameter counts of a model",
                        description="Print the architecture, total and per-token-active parameter counts, MoE "
                                    "layers, routed/shared experts and top-k. Reads config.json only.")
  info.add_argument("--model", required=True, help="HF model directory or preset name (e.g. deepseek-v2-lite)")
  info.set_defaults(func=cmd_info)

  init = sub.add_parser("init", help="write a randomly initialised model as an HF directory",
                        description="Build a model from a preset or config.json with random weights and write it "
                                    "as a Hugging Face directory (for tests, benchmarks and the demo).")
  init.add_argument("--model", required=True, help="preset name or directory holding config.json")
  init.add_argument("--out", required=True, type=Path, help="output directory")
  init.add_argument("--seed", type=int, default=0)
  init.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  init.set_defaults(func=cmd_init)
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
