"""Inference throughput: ESFT scoring against a plain forward pass, and batched greedy decoding against
transformers' `generate` on the same weights. One model, random weights, DeepSeek-V2-Lite widths.

    python experiments/bench_infer.py --layers 8       # one GPU, bf16
    python experiments/bench_infer.py --tiny           # CPU, seconds

Scoring: the jitted step of `esft_jax.esft.routing_pass` that `esft-jax score` runs per batch (routing totals
accumulated on the device; "+ routing to host" is the step `--write-logs` uses, which also copies every token's
routing to the host), against a jitted forward pass of the same model and batch that returns the logits.
tokens/s = batch * seq / median step time; the issue's bar is score >= 0.9 x forward. The scoring step never
needs the logits, so XLA drops the LM head from it.

Generation: `esft_jax.generate.generate` and transformers' `generate`, both greedy and never stopping at EOS,
on the same prompts (random ids, one length) and the same weights (written by `save_hf_model`, read by
`from_pretrained`). tokens/s = batch * new tokens / wall time of one whole call, prefill included, after a
warm-up call (JAX compiles there). Agreement: the rows whose first --agree new tokens are identical, and the
mean length of the common prefix (in bf16, near-ties between the top two logits can flip a greedy choice).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# JAX must leave room for the transformers model that runs in this process after it.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")

import jax
import jax.numpy as jnp
import numpy as np

from esft_jax import sharding
from esft_jax.config import config_from_hf, read_hf_config
from esft_jax.esft.routing_pass import make_scoring_step
from esft_jax.esft.scores import RoutingTotals
from esft_jax.generate import SamplingConfig, generate
from esft_jax.interop.hf import save_hf_model
from esft_jax.model.transformer import Transformer, init_params


def median_ms(run: Callable[[], object], iters: int) -> float:
  """Median wall time of `run` (which must block until its work is done) after one warm-up call."""
  run()
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e3


def print_row(cells: list[str]) -> None:
  print("| " + " | ".join(cells) + " |", flush=True)


def bench_scoring(args, config, params, dtype) -> None:
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, config.vocab_size, size=(args.batch, args.seq)).astype(np.int32)
  segments = np.ones_like(tokens)
  model = Transformer(config, expert_impl=args.expert_impl, dtype=dtype, max_segments=1)  # as the scorer's
  forward = jax.jit(lambda p, t, s: model.apply({"params": p}, t, s).logits)

  def scorer(with_routing: bool) -> Callable[[], object]:
    step = make_scoring_step(config, args.expert_impl, dtype, with_routing=with_routing)
    # Donated by every call, so each call passes the one the last returned. Put on the mesh's sharding as the
    # step returns it: with the single-device sharding that `sharding.place` keeps, the second call would see
    # a new input type and compile again.
    totals = [jax.device_put(RoutingTotals.zeros(len(config.moe_layer_ids), config.num_experts),
                             sharding.replicated(sharding.single_device_mesh()))]

    def run():
      totals[0], routing = step(params, totals[0], tokens, segments)
      jax.block_until_ready(totals[0])
      if with_routing:
        jax.device_get(routing)

    return run

  cases = [("forward (logits)", lambda: jax.block_until_ready(forward(params, tokens, segments))),
           ("score (routing totals)", scorer(False)),
           ("score + routing to host (--write-logs)", scorer(True))]
  print_row(["pass", "batch x seq", "ms", "tokens/s", "vs forward"])
  print("|" + "---|" * 5, flush=True)
  forward_ms = None
  for name, run in cases:
    ms = median_ms(run, args.iters)
    forward_ms = forward_ms or ms
    print_row([name, f"{args.batch} x {args.seq}", f"{ms:.2f}", f"{args.batch * args.seq / ms * 1e3:,.0f}",
               f"{forward_ms / ms:.2f}"])


def jax_generate(args, config, params, dtype, prompts) -> tuple[float, list[list[int]]]:
  sampling = SamplingConfig(max_new_tokens=args.new_tokens)
  call = lambda: generate(config, params, prompts, sampling, eos_id=None, batch_size=len(prompts), dtype=dtype,
                          expert_impl=args.expert_impl)
  call()  # compiles the prefill and the decoding chunk
  start = time.perf_counter()
  results = call()
  return time.perf_counter() - start, [r["ids"] for r in results]


def torch_generate(args, model_dir: str, prompts) -> tuple[float, list[list[int]], str]:
  import torch
  import transformers

  device = "cuda" if torch.cuda.is_available() else "cpu"
  dtype = torch.float32 if args.tiny else torch.bfloat16
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
  model.generation_config.eos_token_id = None  # as the JAX side: every row decodes all the new tokens
  ids = torch.tensor(prompts, device=device)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def call(new_tokens: int):
    with torch.no_grad():
      out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=0)
    sync()
    return out[:, ids.shape[1]:].tolist()

  call(2)  # CUDA and cuBLAS start-up
  start = time.perf_counter()
  generated = call(args.new_tokens)
  about = (f"torch {torch.__version__}, transformers {transformers.__version__} "
           f"(attention {model.config._attn_implementation}, experts {model.config._experts_implementation})")
  return time.perf_counter() - start, generated, about


def common_prefix(a: list[int], b: list[int]) -> int:
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  return n


def bench_generation(args, config, hf, params, dtype) -> None:
  rng = np.random.default_rng(1)
  prompts = rng.integers(3, config.vocab_size, size=(args.gen_batch, args.prompt_len)).tolist()
  jax_s, jax_ids = jax_generate(args, config, params, dtype, prompts)
  with tempfile.TemporaryDirectory() as model_dir:
    save_hf_model(model_dir, config, params, hf)
    torch_s, torch_ids, about = torch_generate(args, model_dir, prompts)
  new = args.gen_batch * args.new_tokens
  print_row(["generator", "batch", "prompt", "new tokens", "s", "tokens/s", "vs transformers"])
  print("|" + "---|" * 7)
  for name, seconds in (("esft_jax.generate", jax_s), ("transformers generate", torch_s)):
    print_row([name, str(args.gen_batch), str(args.prompt_len), str(args.new_tokens), f"{seconds:.2f}",
               f"{new / seconds:,.0f}", f"{torch_s / seconds:.2f}"])
  prefixes = [common_prefix(a, b) for a, b in zip(jax_ids, torch_ids)]
  agree = sum(p >= args.agree for p in prefixes)
  print(f"\nagreement: {agree}/{len(prefixes)} rows identical on the first {args.agree} new tokens; "
        f"mean common prefix {statistics.mean(prefixes):.1f} of {args.new_tokens} tokens")
  print(f"# {about}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--layers", type=int, default=8, help="decoder layers (layer 0 dense, the rest MoE)")
  parser.add_argument("--batch", type=int, default=8, help="scoring batch (rows)")
  parser.add_argument("--seq", type=int, default=2048, help="scoring row length")
  parser.add_argument("--iters", type=int, default=10, help="timed scoring steps per pass")
  parser.add_argument("--gen-batch", type=int, default=16)
  parser.add_argument("--prompt-len", type=int, default=128)
  parser.add_argument("--new-tokens", type=int, default=64)
  parser.add_argument("--agree", type=int, default=16, help="new tokens that must match for a row to agree")
  parser.add_argument("--expert-impl", default="auto")
  parser.add_argument("--skip", default="", help="comma-separated: scoring, generation")
  parser.add_argument("--tiny", action="store_true", help="the tiny-deepseek preset on CPU, to keep this working")
  args = parser.parse_args()
  if args.tiny:
    args.layers, args.batch, args.seq, args.iters = 3, 2, 64, 2
    args.gen_batch, args.prompt_len, args.new_tokens, args.agree = 3, 16, 8, 8
  hf = dict(read_hf_config("tiny-deepseek" if args.tiny else "deepseek-v2-lite"), num_hidden_layers=args.layers)
  config = config_from_hf(hf)
  dtype = jnp.float32 if args.tiny else jnp.bfloat16
  params = init_params(config, jax.random.key(0), param_dtype=dtype)
  widths = "tiny-deepseek" if args.tiny else "DeepSeek-V2-Lite widths"
  print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}; {widths}, {args.layers} layers, "
        f"{jnp.dtype(dtype).name}, experts {args.expert_impl}", flush=True)
  skip = set(filter(None, args.skip.split(",")))
  if "scoring" not in skip:
    bench_scoring(args, config, params, dtype)
  if "generation" not in skip:
    print(flush=True)
    bench_generation(args, config, hf, params, dtype)


if __name__ == "__main__":
  main()
