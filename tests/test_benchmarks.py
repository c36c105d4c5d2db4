"""The benchmark scripts stay runnable: their --tiny runs on CPU print their tables, and what the tables
compare agrees (the same first loss on every JAX expert path, the same greedy tokens as transformers). Timings
are never asserted."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_tiny(script: str, *options: str) -> tuple[str, list[list[dict[str, str]]]]:
  """The output of `script --tiny [options]`, and each markdown table in it as rows of {column: cell}."""
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  proc = subprocess.run([sys.executable, str(REPO / "experiments" / script), "--tiny", *options],
                        capture_output=True, text=True, timeout=600, env=env, check=True)
  cells = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]
  lines = proc.stdout.splitlines()
  tables = []
  for i, line in enumerate(lines[:-1]):
    if line.startswith("| ") and lines[i + 1].startswith("|---"):
      header, rows = cells(line), []
      for row in lines[i + 2:]:
        if not row.startswith("| "):
          break
        rows.append(dict(zip(header, cells(row))))
      tables.append(rows)
  return proc.stdout, tables


def number(cell: str) -> float:
  return float(cell.replace(",", ""))


def test_bench_train_tiny_runs_every_path_and_torch(tmp_path):
  out, [table] = run_tiny("bench_train.py", "--remat", "--breakdown",  # JAX paths with layers recomputed
                          "--paths", "grouped,auto,torch,auto+fused", "--profile", str(tmp_path))
  rows = {row["path"]: row for row in table}
  for path in ("grouped", "auto"):  # the step's time split into forward, backward and the rest
    assert re.search(rf"# {path} breakdown: forward [\d.]+ ms, backward -?[\d.]+ ms, optimizer and the rest "
                     rf"-?[\d.]+ ms of the [\d.]+ ms step", out), out
  assert list(rows) == ["torch", "grouped", "auto", "auto+fused"]
  assert "# auto profile: no device events in the trace (a CPU run has none)" in out  # traced, nothing to count
  for row in rows.values():
    assert number(row["tokens/s"]) > 0, row
  # Same weights and batch on every path; fused attention too (XLA's on a CPU, so equal to 4 decimals).
  assert rows["grouped"]["first loss"] == rows["auto"]["first loss"] == rows["auto+fused"]["first loss"]
  # torch has its own random weights, but the same loss on the same batch is near ln(vocab) for both.
  assert abs(number(rows["torch"]["first loss"]) - number(rows["auto"]["first loss"])) < 0.5


def test_bench_infer_tiny_scores_and_generates_like_transformers():
  out, [scoring, generation] = run_tiny("bench_infer.py")
  assert [row["pass"] for row in scoring] == ["forward (logits)", "score (routing totals)",
                                              "score + routing to host (--write-logs)"]
  assert [row["generator"] for row in generation] == ["esft_jax.generate", "transformers generate"]
  for row in scoring + generation:
    assert number(row["tokens/s"]) > 0, row
  assert "agreement: 3/3 rows identical on the first 8 new tokens" in out  # fp32: greedy choices match exactly


def test_bench_sharded_tiny_splits_the_work_and_starts_from_one_loss():
  """Each mesh in its own process on 8 simulated CPU devices (the script sets XLA_FLAGS for them). Meshes with the
  same global batch start from the same loss, and at a fixed per-device batch XLA's FLOPs per device stay those of
  one device: the "grouped" experts' dispatch (a sort over every token) is split, not run whole on every device."""
  out, [table] = run_tiny("bench_sharded.py", "--layers", "2", "--iters", "1", "--expert-impl", "grouped",
                          "--meshes", "data=1", "data=2", "expert=2", "fsdp=2")
  assert [(row["mesh"], row["devices"], row["global batch×seq"]) for row in table] == [
      ("data=1", "1", "2×64"), ("data=2", "2", "4×64"), ("expert=2", "2", "4×64"), ("fsdp=2", "2", "4×64")]
  for row in table:
    assert number(row["tokens/s"]) > 0, row
  assert table[0]["scaling"] == "1.00×"
  for row in table[1:]:
    assert number(row["XLA TFLOP/dev"]) < 1.05 * number(table[0]["XLA TFLOP/dev"]), row
  spread = [line for line in out.splitlines() if line.startswith("first loss at global batch 4: 3 rows within ")]
  assert len(spread) == 1 and float(spread[0].rsplit(" ", 1)[1]) < 1e-5, out


def test_trace_summary_splits_device_time_by_model_part(tmp_path):
  """A GPU-shaped perfetto trace of 2 steps: kernels on a stream line, HLO ops on the derived "XLA Ops" line
  (which alone names the JAX operations), and a host process that must not count."""
  spec = importlib.util.spec_from_file_location("trace_summary", REPO / "experiments" / "trace_summary.py")
  trace_summary = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(trace_summary)
  meta = lambda kind, pid, name, tid=None: {"ph": "M", "name": kind, "pid": pid, "tid": tid, "args": {"name": name}}
  op = lambda tid, name, dur, scope="": {"ph": "X", "pid": 2, "tid": tid, "name": name, "dur": dur,
                                          "args": {"tf_op": f"jit(step)/Transformer/{scope}"} if scope else {}}
  events = [meta("process_name", 1, "/host:CPU"), meta("process_name", 2, "/device:GPU:0"),
            meta("thread_name", 2, "Stream #13(Compute)", 7), meta("thread_name", 2, "XLA Ops", 8),
            {"ph": "X", "pid": 1, "tid": 1, "name": "PjitFunction(step)", "dur": 99_000},
            op(7, "nvjet_gemm", 6_000), op(7, "flash_fprop", 2_000), op(7, "nvjet_gemm", 2_000),
            op(8, "dot.1", 6_000, "layers_1/mlp/experts/gate_proj"),
            op(8, "fusion.2", 2_000, "layers_1/self_attn/sdpa"),
            op(8, "dot.3", 1_000, "layers_1/mlp/shared_experts/up_proj/dot_general"),
            op(8, "fusion.4", 1_000, "layers_1/mlp/gate/dot_general")]
  by_part, by_kernel = trace_summary.summarize({"traceEvents": events}, steps=2)
  assert by_part == [("routed experts", 3.0), ("attention", 1.0), ("shared experts", 0.5), ("router", 0.5)]
  assert [(k, ms) for k, _, ms in by_kernel] == [("nvjet_gemm", 4.0), ("flash_fprop", 1.0)]
  text = trace_summary.format_summary({"traceEvents": events}, 2, "auto")
  assert text.startswith("# auto profile: 5.0 ms of device time per step; device lines: Stream #13(Compute) (3 "
                         "events), XLA Ops (4 events); event fields: tf_op")
  assert "| attention | 1.0 | 20.0% |" in text
  host_only = [events[0], events[4]]
  assert "no device events" in trace_summary.format_summary({"traceEvents": host_only}, 2, "cpu")
