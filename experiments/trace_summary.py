"""Where a step's device time goes, from a `jax.profiler.trace(..., create_perfetto_trace=True)` folder: device
time per step by model part (attention, routed experts, shared experts, router, dense MLP, LM head and loss,
optimizer, ...) and the kernels that take the most of it.

    python experiments/trace_summary.py TRACE_DIR --steps 2        # a trace of 2 steps
    python experiments/bench_train.py --paths auto --profile DIR   # traces and prints this for each path

Only the kernels on a GPU's stream lines ("Stream #N") count: the lines XLA derives from them ("XLA Ops", "XLA
Modules", ...) cover the same time again, and a CPU trace has no device lines at all (the summary says so). A
kernel is assigned to a part by the Flax module path of the JAX operation it came from, which XLA's kernel
annotation carries among the event's fields, e.g. `.../layers_3/self_attn/...` is attention.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from collections import defaultdict
from pathlib import Path

# First match wins: the more specific module names come first. A path may start at any module (XLA drops the
# prefix every operation of the program shares).
PARTS = (("shared experts", r"(^|/)shared_experts/"), ("routed experts", r"(^|/)(routed_)?experts/"),
         ("router", r"(^|/)mlp/gate/"), ("attention", r"(^|/)self_attn/"), ("dense MLP", r"(^|/)mlp/"),
         ("norms", r"(layernorm|(^|/)norm)/"), ("LM head and loss", r"(lm_head|log_softmax|logsumexp|cross_entropy)"),
         ("embedding", r"embed_tokens"), ("optimizer", r"(adam|optax|opt_state|clip|global_norm)"))


NO_KERNELS = "no kernels on a device stream line in the trace (a CPU run has none)"


def device_lines(trace: dict) -> dict[str, list[dict]]:
  """The complete ("X") events of every device process (named /device:...), by line (thread) name."""
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


def hlo_op_names(hlo_text: str) -> dict[str, str]:
  """Each instruction of an optimized HLO module (`compiled.as_text()`) -> the JAX operation's name stack in its
  metadata. A fused kernel's event names only its fusion (`hlo_op`), and the fusion carries its root's name."""
  return dict(re.findall(r'%?([\w.-]+) = [^\n]*?metadata=\{op_name="([^"]+)"', hlo_text))


def op_path(event: dict, op_names: dict[str, str] | None = None) -> str:
  """The name stack of the event's `hlo_op` in `op_names`, else XLA's `tf_op` field, else the first field that
  holds a path (has a "/"), else the kernel's name. (For a fusion of operations from several modules, `tf_op` holds
  only their common prefix, e.g. `jit(step)/jvp(Transformer)`; the HLO names the fusion's root.)"""
  args = event.get("args", {})
  if op_names and str(args.get("hlo_op")) in op_names:
    return op_names[str(args["hlo_op"])]
  return next((str(v) for v in (args.get("tf_op", ""), *args.values()) if "/" in str(v)), event["name"])


def part_of(name: str) -> str:
  return next((part for part, pattern in PARTS if re.search(pattern, name)), "other")


def kernel_events(lines: dict[str, list[dict]]) -> list[dict]:
  """The events of the stream lines among `device_lines`."""
  return [e for name, events in lines.items() if name.startswith("Stream") for e in events]


def summarize(trace: dict, steps: int, top: int = 15, op_names: dict[str, str] | None = None
              ) -> tuple[list[tuple[str, float]], list[tuple[str, str, float]]]:
  """(part, ms per step) by decreasing time, and the `top` (kernel, part) pairs as (kernel, part, ms per step)."""
  return _summarize(kernel_events(device_lines(trace)), steps, top, op_names)


def ms_by(kernels: list[dict], steps: int, key) -> list[tuple[object, float]]:
  """(key(event), ms per step) summed over the kernels, longest first; a key of None leaves the event out."""
  total = defaultdict(float)
  for event in kernels:
    group = key(event)
    if group is not None:
      total[group] += event.get("dur", 0) / 1e3 / steps  # trace durations are in microseconds
  return sorted(total.items(), key=lambda kv: -kv[1])


def _summarize(kernels: list[dict], steps: int, top: int = 15, op_names: dict[str, str] | None = None):
  part = lambda event: part_of(op_path(event, op_names))
  by_part = ms_by(kernels, steps, part)
  by_kernel = [(k, p, ms) for (k, p), ms in ms_by(kernels, steps, lambda e: (e["name"], part(e)))[:top]]
  return by_part, by_kernel


def _other_ops(kernels: list[dict], steps: int, op_names: dict[str, str], top: int = 25) -> list[tuple[str, float]]:
  """The name stacks of the kernels left in "other", by ms per step: what PARTS does not place yet."""
  path = lambda event: op_path(event, op_names)
  return ms_by(kernels, steps, lambda e: path(e) if part_of(path(e)) == "other" else None)[:top]


def idle_gaps(kernels: list[dict], top: int = 8) -> tuple[float, list[tuple[float, str, str]]]:
  """The trace's span from the first kernel's start to the last one's end (ms), and its `top` longest stretches
  with no kernel running, as (ms, the kernel before, the kernel after), each kernel named by its hlo_op."""
  spans = sorted((e["ts"], e["ts"] + e.get("dur", 0), e) for e in kernels if "ts" in e)
  if not spans:
    return 0.0, []
  name = lambda e: str(e.get("args", {}).get("hlo_op") or e["name"])[:60]
  gaps, end, last = [], spans[0][1], spans[0][2]
  for start, stop, event in spans[1:]:
    if start > end:
      gaps.append(((start - end) / 1e3, name(last), name(event)))
    if stop > end:
      end, last = stop, event
  return (end - spans[0][0]) / 1e3, sorted(gaps, reverse=True)[:top]


def load_trace(trace_dir: str | Path) -> dict:
  files = sorted(Path(trace_dir).rglob("perfetto_trace.json.gz"))
  if not files:
    raise FileNotFoundError(f"{trace_dir}: no perfetto_trace.json.gz under it; trace with "
                            "jax.profiler.trace(DIR, create_perfetto_trace=True)")
  with gzip.open(files[-1]) as f:
    return json.load(f)


def format_summary(trace: dict, steps: int, label: str, hlo_text: str | None = None) -> str:
  """The tables of `summarize`; with the program's optimized HLO (`hlo_text`), fused kernels are placed by their
  fusion's name stack, and the largest operations left in "other" are listed by it."""
  op_names = hlo_op_names(hlo_text) if hlo_text else None
  lines_seen = device_lines(trace)
  kernels = kernel_events(lines_seen)
  by_part, by_kernel = _summarize(kernels, steps, op_names=op_names)
  if not by_part:
    return (f"# {label} profile: {NO_KERNELS}; device lines: {', '.join(name or '-' for name in lines_seen) or '-'}")
  total = sum(ms for _, ms in by_part)
  fields = sorted({key for e in kernels[:100] for key in e.get("args", {})})
  lines = [f"# {label} profile: {total:.1f} ms of kernel time per step; device lines: "
           + ", ".join(f"{name or '-'} ({len(events)} events)" for name, events in lines_seen.items())
           + f"; kernel fields: {', '.join(fields) or '-'}", "", "| part | ms per step | share |", "|---|---|---|"]
  lines += [f"| {part} | {ms:.1f} | {ms / total:.1%} |" for part, ms in by_part]
  span, gaps = idle_gaps(kernels)
  if span:
    lines += ["", f"# from the first kernel to the last: {span / steps:.1f} ms per step, of which no kernel runs in "
              f"{span / steps - total:.1f} ms (the steps' boundaries included); the longest idle stretches:", "",
              "| idle ms | after | before |", "|---|---|---|"]
    lines += [f"| {ms:.2f} | {before} | {after} |" for ms, before, after in gaps]
  lines += ["", "| kernel | part | ms per step | share |", "|---|---|---|---|"]
  lines += [f"| {kernel[:80]} | {part} | {ms:.2f} | {ms / total:.1%} |" for kernel, part, ms in by_kernel]
  if op_names:
    lines += ["", "| operation in other (name stack) | ms per step |", "|---|---|"]
    lines += [f"| {path[-150:]} | {ms:.2f} |" for path, ms in _other_ops(kernels, steps, op_names)]
  else:  # what an unassigned kernel carries, to extend PARTS from
    other = next((e for e in sorted(kernels, key=lambda e: -e.get("dur", 0)) if part_of(op_path(e)) == "other"),
                 None)
    if other:
      fields = json.dumps(other.get("args", {}))[:400]
      lines.append(f"# the longest kernel in other: {other['name'][:60]}, fields {fields}")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("trace_dir", help="the folder given to jax.profiler.trace")
  parser.add_argument("--steps", type=int, default=1, help="steps the trace holds (times are per step)")
  parser.add_argument("--hlo", type=Path, help="the traced program's optimized HLO text, to place fused kernels")
  args = parser.parse_args()
  hlo_text = args.hlo.read_text() if args.hlo else None
  print(format_summary(load_trace(args.trace_dir), args.steps, str(args.trace_dir), hlo_text))


if __name__ == "__main__":
  main()
