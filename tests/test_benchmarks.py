"""The benchmark scripts stay runnable: their --tiny runs on CPU print their tables, and what the tables
compare agrees (the same first loss on every JAX expert path, the same greedy tokens as transformers). Timings
are never asserted."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

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


def load_script(name: str):
  """experiments/NAME.py as a module (the folder is no package)."""
  spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


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
  assert "# auto profile: no kernels on a device stream line in the trace (a CPU run has none)" in out
  for row in rows.values():
    assert number(row["tokens/s"]) > 0, row
  # Same weights and batch on every path; fused attention too (XLA's on a CPU, so equal to 4 decimals).
  assert rows["grouped"]["first loss"] == rows["auto"]["first loss"] == rows["auto+fused"]["first loss"]
  # torch has its own random weights, but the same loss on the same batch is near ln(vocab) for both.
  assert abs(number(rows["torch"]["first loss"]) - number(rows["auto"]["first loss"])) < 0.5


def test_bench_attention_tiny_runs_every_variant_and_they_agree():
  out, [table] = run_tiny("bench_attention.py")
  assert [(row["variant"], row["pass"]) for row in table] == [
      (variant, p) for variant in ("reference", "fused", "bias") for p in ("fwd", "fwd+bwd")]
  for row in table:  # rows of one whole segment: every variant is the same function
    assert number(row["ms"]) > 0 and number(row["max abs diff"]) < 1e-4, row
  assert "# causal: left out, needs a GPU" in out
  _, [packed] = run_tiny("bench_attention.py", "--segments", "4")
  assert [row["variant"] for row in packed] == ["reference"] * 2 + ["fused"] * 2 + ["bias"] * 2
  for row in packed:
    assert number(row["max abs diff"]) < 1e-4, row


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


def test_trace_summary_splits_device_time_by_model_part():
  """A GPU-shaped perfetto trace of 2 steps: kernels on a stream line, whose fields hold the operation's module
  path (with or without the program's common prefix), a derived "XLA Ops" line and a host process that must not
  count."""
  trace_summary = load_script("trace_summary")
  meta = lambda kind, pid, name, tid=None: {"ph": "M", "name": kind, "pid": pid, "tid": tid, "args": {"name": name}}
  kernel = lambda name, dur, path: {"ph": "X", "pid": 2, "tid": 7, "name": name, "dur": dur,
                                    "args": {"hlo_op": "fusion.1", "name": path} if path else {}}
  events = [meta("process_name", 1, "/host:CPU"), meta("process_name", 2, "/device:GPU:0"),
            meta("thread_name", 2, "Stream #13(Compute)", 7), meta("thread_name", 2, "XLA Ops", 8),
            {"ph": "X", "pid": 1, "tid": 1, "name": "PjitFunction(step)", "dur": 99_000},
            {"ph": "X", "pid": 2, "tid": 8, "name": "fusion.1", "dur": 99_000, "args": {}},
            kernel("nvjet_gemm", 4_000, "jit(step)/Transformer/layers_1/mlp/experts/gate_proj/dot_general"),
            kernel("nvjet_gemm", 2_000, "layers_1/mlp/routed_experts/dot_general"),
            {**kernel("flash_fprop", 2_000, ""),  # XLA's tf_op wins over other fields with a "/"
             "args": {"kernel_details": "grid 1/2", "tf_op": "layers_1/self_attn/dot_product_attention"}},
            kernel("nvjet_gemm", 1_000, "layers_1/mlp/shared_experts/up_proj/dot_general"),
            kernel("loop_fusion", 1_000, "")]
  by_part, by_kernel = trace_summary.summarize({"traceEvents": events}, steps=2)
  assert by_part == [("routed experts", 3.0), ("attention", 1.0), ("shared experts", 0.5), ("other", 0.5)]
  assert by_kernel == [("nvjet_gemm", "routed experts", 3.0), ("flash_fprop", "attention", 1.0),
                       ("nvjet_gemm", "shared experts", 0.5), ("loop_fusion", "other", 0.5)]
  text = trace_summary.format_summary({"traceEvents": events}, 2, "auto")
  assert text.startswith("# auto profile: 5.0 ms of kernel time per step; device lines: XLA Ops (1 events), "
                         "Stream #13(Compute) (5 events); kernel fields: hlo_op, kernel_details, name, tf_op")
  assert "| attention | 1.0 | 20.0% |" in text
  assert text.endswith("# the longest kernel in other: loop_fusion, fields {}")
  host_only = [events[0], events[4]]
  assert "no kernels on a device stream line" in trace_summary.format_summary({"traceEvents": host_only}, 2, "cpu")


def test_trace_summary_places_fused_kernels_by_their_hlo_names():
  """A kernel whose event names only its fusion is placed by that fusion's name stack in the optimized HLO (of a
  program compiled here); a kernel the HLO does not name stays in "other", listed under its own name."""
  import jax
  import jax.numpy as jnp

  trace_summary = load_script("trace_summary")

  def f(x):
    with jax.named_scope("layers_1/mlp/experts"):
      return jnp.tanh(x) * 2 + x

  hlo = jax.jit(f).lower(jnp.ones(8)).compile().as_text()
  op_names = trace_summary.hlo_op_names(hlo)
  fusions = [name for name in op_names if "fusion" in name]
  assert len(fusions) == 1 and op_names[fusions[0]] == "jit(f)/layers_1/mlp/experts/add", op_names
  events = [{"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "thread_name", "pid": 2, "tid": 7, "args": {"name": "Stream #13(Compute)"}},
            {"ph": "X", "pid": 2, "tid": 7, "name": "loop_fusion", "ts": 0, "dur": 3_000,  # tf_op: a common prefix
             "args": {"hlo_op": fusions[0], "tf_op": "jit(f)/layers_1"}},
            {"ph": "X", "pid": 2, "tid": 7, "name": "memset", "ts": 5_000, "dur": 1_000,
             "args": {"hlo_op": "elsewhere"}}]
  by_part, _ = trace_summary.summarize({"traceEvents": events}, steps=1, op_names=op_names)
  assert by_part == [("routed experts", 3.0), ("other", 1.0)]
  text = trace_summary.format_summary({"traceEvents": events}, 1, "cpu", hlo)
  assert "# from the first kernel to the last: 6.0 ms per step, of which no kernel runs in 2.0 ms" in text
  assert "| 2.00 | " + fusions[0] + " | elsewhere |" in text
  assert text.endswith("| operation in other (name stack) | ms per step |\n|---|---|\n| memset | 1.00 |"), text


def test_hlo_traffic_counts_operands_results_and_loop_trips():
  """hlo_traffic on programs compiled here: an elementwise op moves its operands and result, a loop body counts once
  per trip, and a scatter into an argument the program may not overwrite shows the full-size copy that donation
  removes (what it found in the ESFT step)."""
  hlo_traffic = load_script("hlo_traffic")
  rows_of = lambda fn, *args, **jit: hlo_traffic.traffic_rows(jax.jit(fn, **jit).lower(*args).compile().as_text())
  x = jnp.ones(1000, jnp.float32)
  [row] = rows_of(lambda a, b: a * 2 + b, x, x)
  assert (row.bytes, row.runs) == (3 * 4000, 1)
  loop = [r for r in rows_of(lambda a: jax.lax.fori_loop(0, 5, lambda i, c: c * 2 + 1, a), x) if "1000" in r.shape]
  assert sum(r.runs for r in loop if r.kind != "copy") == 5
  stack, new_rows = jnp.zeros((64, 32, 16)), jnp.ones((2, 32, 16))
  write = lambda s, r: s.at[jnp.array([1, 3])].set(r, unique_indices=True)
  copies = lambda **jit: [r for r in rows_of(write, stack, new_rows, **jit) if r.kind == "copy"]
  assert [r.bytes for r in copies()] == [2 * stack.size * 4]
  assert copies(donate_argnums=0) == []
  assert "| GB | ms | runs | kind | result | op name |" in hlo_traffic.summary(rows_of(write, stack, new_rows), 5, 4.8)
