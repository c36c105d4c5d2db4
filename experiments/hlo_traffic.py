r"""Where an optimised XLA program moves its bytes: each instruction's operands and result, summed by what it does.

    XLA_FLAGS="--xla_dump_to=/tmp/hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=jit_step" \
        python experiments/bench_train.py --layers 27 --batch 4 --paths auto
    python experiments/hlo_traffic.py /tmp/hlo/module_*.jit_step.sm_9.0a_gpu_after_optimizations.txt

Reads the text of an optimised program (XLA's `*after_optimizations.txt` dump, or `compiled.as_text()`) and, for
every instruction of the entry computation and of the while loops it runs (times their known trip counts), adds
the bytes of its operands and its result. That is an upper bound on the memory traffic: a scatter that writes in
place, or a fusion that reads part of an operand, counts the whole buffer. Matmuls and custom kernels are listed
too, though they are bound by arithmetic rather than bytes. Rows group instructions by kind (the fusion's kind for
fusions), result shape and JAX op name (`layers_N` for every layer), largest first; ms is the bytes at --bandwidth.
A stack-sized copy in these rows is what in-place writes of the trained expert rows exist to avoid (a frozen
stack copied before its rows are written, every step).
"""

from __future__ import annotations

import argparse
import collections
import re
from typing import NamedTuple

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_INSTRUCTION = re.compile(r"^(?:ROOT )?%(\S+) = (.+?) ([a-z][\w-]*)\((.*?)\)(?:, |$)")
_SKIPPED = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast"}  # no traffic of their own


class Row(NamedTuple):
  bytes: float  # over all runs
  runs: int
  kind: str
  shape: str
  op_name: str


def array_bytes(shape_text: str) -> list[float]:
  """The bytes of each array in a shape (one for an array, one per element for a tuple)."""
  sizes = []
  for dtype, dims in _ARRAY.findall(shape_text):
    count = 1
    for dim in filter(None, dims.split(",")):
      count *= int(dim)
    sizes.append(count * _DTYPE_BYTES[dtype])
  return sizes


def parse_computations(text: str) -> dict[str, list[str]]:
  computations, current = {}, None
  for line in text.splitlines():
    match = _COMPUTATION.match(line)
    if match:
      current = computations.setdefault(match.group(1), [])
    elif line.startswith("}"):
      current = None
    elif current is not None and line.strip():
      current.append(line.strip())
  return computations


def traffic_rows(text: str) -> list[Row]:
  """One row per executed instruction (while bodies once per known iteration), bytes of operands and result."""
  computations = parse_computations(text)
  entry = re.search(r"^ENTRY %(\S+) ", text, re.M)
  if entry is None:
    raise ValueError("no ENTRY computation: pass the text of an optimised HLO module (*after_optimizations.txt)")
  rows: list[Row] = []

  def walk(name: str, times: int) -> None:
    sizes: dict[str, list[float]] = {}
    for line in computations.get(name, []):
      match = _INSTRUCTION.match(line)
      if not match:
        continue
      result, shape, kind, operands = match.groups()
      sizes[result] = array_bytes(shape)
      if kind == "while":
        body = re.search(r"body=%([\w.\-]+)", line).group(1)
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
        walk(body, times * (int(trips.group(1)) if trips else 1))
        continue
      if kind in _SKIPPED:
        continue
      moved = sum(sizes[result])
      for operand, element in re.findall(r"%([\w.\-]+)(?:#(\d+))?", operands):
        parts = sizes.get(operand, [])
        moved += parts[int(element)] if element and int(element) < len(parts) else sum(parts)
      if kind == "fusion":
        kind = re.sub(r"[._]\d+$", "", result)  # loop_add_fusion.12 -> loop_add_fusion
      op_name = re.search(r'op_name="([^"]*)"', line)
      rows.append(Row(moved * times, times, kind, shape[:48],
                      re.sub(r"layers_\d+", "layers_N", op_name.group(1)) if op_name else ""))

  walk(entry.group(1), 1)
  return rows


def summary(rows: list[Row], top: int, bandwidth_tb_s: float) -> str:
  grouped: dict[tuple, list[float]] = collections.defaultdict(lambda: [0.0, 0])
  for row in rows:
    entry = grouped[(row.kind, row.shape, row.op_name)]
    entry[0] += row.bytes
    entry[1] += row.runs
  total = sum(row.bytes for row in rows)
  ms = lambda b: b / (bandwidth_tb_s * 1e12) * 1e3
  lines = [f"# {sum(row.runs for row in rows)} instructions run, {total / 1e9:.1f} GB of operands and results, "
           f"{ms(total):.1f} ms at {bandwidth_tb_s} TB/s (an upper bound)",
           "| GB | ms | runs | kind | result | op name |", "|---|---|---|---|---|---|"]
  for (kind, shape, op_name), (moved, count) in sorted(grouped.items(), key=lambda kv: -kv[1][0])[:top]:
    lines.append(f"| {moved / 1e9:.2f} | {ms(moved):.2f} | {count} | {kind} | {shape} | {op_name[-100:]} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("hlo", help="an optimised HLO module as text")
  parser.add_argument("--top", type=int, default=30, help="rows to print")
  parser.add_argument("--bandwidth", type=float, default=4.8, help="memory bandwidth in TB/s (H200: 4.8)")
  args = parser.parse_args()
  with open(args.hlo) as f:
    print(summary(traffic_rows(f.read()), args.top, args.bandwidth))


if __name__ == "__main__":
  main()
