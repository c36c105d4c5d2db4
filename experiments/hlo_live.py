r"""What an optimised XLA program holds at its memory peak: the buffers live at the instruction where the entry
computation's live bytes are largest, largest first, with the JAX op that made each.

    XLA_FLAGS="--xla_dump_to=/tmp/hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=jit_step" \
        python experiments/bench_train.py --layers 27 --batch 1 --paths auto
    python experiments/hlo_live.py /tmp/hlo/module_*.jit_step.sm_9.0a_gpu_after_optimizations.txt

Reads the scheduled text of an optimised program (XLA's `*after_optimizations.txt` dump, or `compiled.as_text()`)
and walks its entry computation in schedule order: each instruction's result is live from where it is made to its
last use (the program's arguments from the start, its outputs to the end). Tuples, get-tuple-element and bitcasts
make no buffer: a use of one is a use of what it points to. A while loop's result is its operand's buffers
(XLA updates the loop state in place). The sum is not XLA's plan (`compiled.memory_analysis()`): temporaries inside
called computations are left out, and a result written in place over an operand (a scatter into a donated
argument) counts as a buffer of its own. What it gives that the memory analysis does not is the names: which
buffers are held at the peak, and which JAX operation made them.
"""

from __future__ import annotations

import argparse
import collections
import re

from hlo_traffic import _INSTRUCTION, array_bytes, parse_computations

_ALIASES = {"tuple", "get-tuple-element", "bitcast", "while", "opt-barrier"}  # results that point to operands


def live_at_peak(text: str) -> tuple[int, list[tuple[int, str, str, str]], int]:
  """(peak bytes, [(bytes, name, shape, op name)] live at the peak, position of the peak in the schedule)."""
  computations = parse_computations(text)
  entry = re.search(r"^ENTRY %(\S+) ", text, re.M)
  if entry is None:
    raise ValueError("no ENTRY computation: pass the text of an optimised HLO module (*after_optimizations.txt)")
  lines = [m.groups() + (line,) for line in computations[entry.group(1)] if (m := _INSTRUCTION.match(line))]
  sources: dict[str, set[str]] = {}  # instruction -> the buffers it points to
  size, info, last_use, first = {}, {}, {}, {}
  parameters, root = [], None
  for position, (result, shape, kind, operands, line) in enumerate(lines):
    used = set()
    for operand in re.findall(r"%([\w.\-]+)", operands):
      used |= sources.get(operand, set())
    for buffer in used:
      last_use[buffer] = position
    if kind in _ALIASES:
      sources[result] = used
    else:
      sources[result] = {result}
      size[result] = sum(array_bytes(shape))
      op_name = re.search(r'op_name="([^"]*)"', line)
      info[result] = (shape[:60], op_name.group(1) if op_name else "")
      first[result] = 0 if kind == "parameter" else position
      if kind == "parameter":
        parameters.append(result)
      last_use.setdefault(result, position)
    if line.startswith("ROOT "):
      root = result
  end = len(lines)
  for buffer in sources.get(root, set()) | set(parameters):  # outputs, and arguments, held for the whole call
    last_use[buffer] = end
  delta = collections.Counter()
  for buffer, nbytes in size.items():
    delta[first[buffer]] += nbytes
    delta[last_use[buffer] + 1] -= nbytes
  live, peak, peak_at = 0, -1, 0
  for position in range(end + 2):
    live += delta[position]
    if live > peak:
      peak, peak_at = live, position
  held = [(size[b], b, *info[b]) for b in size if first[b] <= peak_at <= last_use[b]]
  return peak, sorted(held, reverse=True), peak_at


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("hlo", help="an optimised HLO module as text")
  parser.add_argument("--top", type=int, default=25, help="buffer groups to print")
  args = parser.parse_args()
  with open(args.hlo) as f:
    peak, held, position = live_at_peak(f.read())
  groups: dict[tuple, list[int]] = collections.defaultdict(lambda: [0, 0])
  for nbytes, _, shape, op_name in held:
    key = (shape, re.sub(r"layers_\d+", "layers_N", op_name)[-110:])
    groups[key][0] += nbytes
    groups[key][1] += 1
  print(f"# {peak / 2**30:.2f} GiB live at instruction {position} of the entry computation, {len(held)} buffers")
  print("| GiB | buffers | shape | op name |\n|---|---|---|---|")
  for (shape, op_name), (nbytes, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:args.top]:
    print(f"| {nbytes / 2**30:.2f} | {count} | {shape} | {op_name} |")


if __name__ == "__main__":
  main()
