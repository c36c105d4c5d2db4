"""Where a step's device time goes, from a `jax.profiler.trace(..., create_perfetto_trace=True)` folder: device
time per step by model part (attention, routed experts, shared experts, router, dense MLP, LM head and loss,
optimizer, ...) and the kernels that take the most of it.

    python experiments/trace_summary.py TRACE_DIR --steps 2        # a trace of 2 steps
    python experiments/bench_train.py --paths auto --profile DIR   # traces and prints this for each path

A kernel is assigned to a part by the Flax module path in the name of the JAX operation it came from (XLA keeps it
as the `tf_op` / `long_name` of each device event), e.g. `.../layers_3/self_attn/...` is attention. Only device
events count (a GPU's kernels and copies); a CPU trace has none, and the summary says so.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from collections import defaultdict
from pathlib import Path

# First match wins: the more specific module names come first.
PARTS = (("shared experts", r"/shared_experts/"), ("routed experts", r"/experts/"), ("router", r"/mlp/gate/"),
         ("attention", r"/self_attn/"), ("dense MLP", r"/mlp/"), ("norms", r"(layernorm|/norm)/"),
         ("LM head and loss", r"(lm_head|log_softmax|logsumexp|cross_entropy|/loss)"),
         ("embedding", r"embed_tokens"), ("optimizer", r"(adam|optax|opt_state|clip|global_norm)"))
OP_NAME_KEYS = ("tf_op", "long_name", "hlo_op", "name")


def device_lines(trace: dict) -> dict[str, list[dict]]:
  """The complete ("X") events of every device process (named /device:...), by line (thread) name. A GPU trace
  has one line per CUDA stream ("Stream #N": the kernels) and lines derived from them ("XLA Ops": one event per
  HLO operation, "XLA Modules", ...) that cover the same time again."""
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  meta = lambda kind: {(e["pid"], e.get("tid")): str(e.get("args", {}).get("name", "")) for e in events
                       if e.get("ph") == "M" and e.get("name") == kind}
  devices = {pid for (pid, _), name in meta("process_name").items() if name.startswith("/device:")}
  threads = meta("thread_name")
  lines = defaultdict(list)
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in devices:
      lines[threads.get((e["pid"], e.get("tid")), "")].append(e)
  return lines


def op_name(event: dict) -> str:
  args = event.get("args", {})
  return next((str(args[k]) for k in OP_NAME_KEYS if args.get(k)), event["name"])


def part_of(name: str) -> str:
  return next((part for part, pattern in PARTS if re.search(pattern, name)), "other")


def summarize(trace: dict, steps: int, top: int = 15) -> tuple[list[tuple[str, float]], list[tuple[str, str, float]]]:
  """(part, ms per step) by decreasing time, and the `top` kernels as (kernel, part, ms per step). Kernels are the
  stream lines' events (every device line's where none is named "Stream"); parts come from the "XLA Ops" line
  where there is one (its events carry the JAX operation names), else from the kernels."""
  lines = device_lines(trace)
  streams = [e for name, events in lines.items() if name.startswith("Stream") for e in events]
  if not streams:
    streams = [e for events in lines.values() for e in events]
  per_step = lambda event: event.get("dur", 0) / 1e3 / steps  # trace durations are in microseconds
  parts, kernels, kernel_part = defaultdict(float), defaultdict(float), {}
  for event in lines.get("XLA Ops") or streams:
    parts[part_of(op_name(event))] += per_step(event)
  for event in streams:
    kernels[event["name"]] += per_step(event)
    kernel_part.setdefault(event["name"], part_of(op_name(event)))
  by_part = sorted(parts.items(), key=lambda kv: -kv[1])
  by_kernel = [(k, kernel_part[k], ms) for k, ms in sorted(kernels.items(), key=lambda kv: -kv[1])[:top]]
  return by_part, by_kernel


def load_trace(trace_dir: str | Path) -> dict:
  files = sorted(Path(trace_dir).rglob("perfetto_trace.json.gz"))
  if not files:
    raise FileNotFoundError(f"{trace_dir}: no perfetto_trace.json.gz under it; trace with "
                            "jax.profiler.trace(DIR, create_perfetto_trace=True)")
  with gzip.open(files[-1]) as f:
    return json.load(f)


def format_summary(trace: dict, steps: int, label: str) -> str:
  by_part, by_kernel = summarize(trace, steps)
  if not by_part:
    return f"# {label} profile: no device events in the trace (a CPU run has none)"
  total = sum(ms for _, ms in by_part)
  seen = device_lines(trace)
  fields = sorted({key for events in seen.values() for e in events[:100] for key in e.get("args", {})})
  lines = [f"# {label} profile: {total:.1f} ms of device time per step; device lines: "
           + ", ".join(f"{name or '-'} ({len(events)} events)" for name, events in seen.items())
           + f"; event fields: {', '.join(fields) or '-'}", "", "| part | ms per step | share |", "|---|---|---|"]
  lines += [f"| {part} | {ms:.1f} | {ms / total:.1%} |" for part, ms in by_part]
  lines += ["", "| kernel | part | ms per step | share |", "|---|---|---|---|"]
  lines += [f"| {kernel[:80]} | {part} | {ms:.2f} | {ms / total:.1%} |" for kernel, part, ms in by_kernel]
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("trace_dir", help="the folder given to jax.profiler.trace")
  parser.add_argument("--steps", type=int, default=1, help="steps the trace holds (times are per step)")
  args = parser.parse_args()
  print(format_summary(load_trace(args.trace_dir), args.steps, str(args.trace_dir)))


if __name__ == "__main__":
  main()
