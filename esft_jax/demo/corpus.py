"""The demo's "general" text: English prose and Python source that every CPython installation ships.

No data set can be downloaded where the demo runs, so the stand-in for the paper's alignment/general data is
the standard library itself: `pydoc_data` topics and the docstrings of a fixed list of modules (prose), and
the source of a fixed list of pure-Python modules (code), cut into documents of a few hundred characters.

The text is a function of the seed and of the installed Python's standard library: a different Python
version gives a different (equally valid) corpus. Modules whose source is absent are skipped.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import random
import zlib
from pathlib import Path

import pydoc_data.topics

# Imported for their docstrings: all pure, side-effect-free on import, present in CPython 3.11+.
PROSE_MODULES = (
    "argparse", "base64", "bisect", "calendar", "collections", "colorsys", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "enum", "fnmatch", "fractions", "functools", "glob",
    "graphlib", "heapq", "html", "itertools", "json", "math", "numbers", "operator", "pathlib", "pprint",
    "queue", "random", "re", "reprlib", "sched", "shlex", "statistics", "string", "struct", "textwrap",
    "uuid",
)
# Read as text (not imported) for their source; none is frozen into the interpreter.
SOURCE_MODULES = (
    "argparse", "base64", "bisect", "calendar", "colorsys", "contextlib", "copy", "csv", "dataclasses",
    "difflib", "enum", "fnmatch", "fractions", "functools", "glob", "graphlib", "heapq", "json.decoder",
    "json.encoder", "numbers", "pprint", "queue", "random", "reprlib", "sched", "shlex", "statistics",
    "string", "textwrap", "tokenize", "uuid",
)
CHUNK_CHARS = 400
MIN_CHUNK_CHARS = 80  # shorter pieces are mostly stray headings and closing lines
HELD_OUT_EVERY = 10  # about 1 chunk in 10 is held out, chosen by a hash of its text


def _module_prose(name: str) -> str:
  """The module's docstring and those of its public members, one block each."""
  module = importlib.import_module(name)
  blocks = [inspect.getdoc(module) or ""]
  for member_name, member in sorted(vars(module).items()):
    if member_name.startswith("_") or getattr(member, "__module__", None) != module.__name__:
      continue
    doc = inspect.getdoc(member)
    if doc:
      blocks.append(f"{name}.{member_name}\n{doc}")
  return "\n\n".join(block for block in blocks if block)


def prose_documents() -> list[str]:
  """English prose: every pydoc topic (sorted by key), then each PROSE_MODULES module's docstrings."""
  topics = pydoc_data.topics.topics
  return [topics[key] for key in sorted(topics)] + [_module_prose(name) for name in PROSE_MODULES]


def source_documents() -> list[str]:
  """Python source of the SOURCE_MODULES that this installation ships as .py files."""
  documents = []
  for name in SOURCE_MODULES:
    spec = importlib.util.find_spec(name)
    origin = spec.origin if spec else None
    if origin and origin.endswith(".py") and Path(origin).is_file():
      documents.append(Path(origin).read_text(encoding="utf-8"))
  return documents


def _split_long(block: str, chunk_chars: int) -> list[str]:
  """A block longer than chunk_chars, cut at line ends (and a single overlong line, anywhere)."""
  pieces, current = [], ""
  for line in block.split("\n"):
    while len(line) > chunk_chars:
      pieces.append(line[:chunk_chars])
      line = line[chunk_chars:]
    if current and len(current) + 1 + len(line) > chunk_chars:
      pieces.append(current)
      current = line
    else:
      current = f"{current}\n{line}" if current else line
  return pieces + [current] if current else pieces


def chunk(text: str, chunk_chars: int = CHUNK_CHARS) -> list[str]:
  """Cuts a document into pieces of at most chunk_chars, preferring blank lines, then line ends, so that each
  piece is a paragraph or a few whole lines of code; pieces under MIN_CHUNK_CHARS are dropped."""
  blocks = []
  for block in text.split("\n\n"):
    block = block.strip("\n")
    if block:
      blocks.extend(_split_long(block, chunk_chars) if len(block) > chunk_chars else [block])
  chunks, current = [], ""
  for block in blocks:
    if current and len(current) + 2 + len(block) > chunk_chars:
      chunks.append(current)
      current = block
    else:
      current = f"{current}\n\n{block}" if current else block
  chunks.append(current)
  return [c for c in chunks if len(c.strip()) >= MIN_CHUNK_CHARS]


@functools.lru_cache(maxsize=4)
def _pools(chunk_chars: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(prose chunks, code chunks), each deduplicated, in source order."""
  def unique_chunks(documents: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(c for doc in documents for c in chunk(doc, chunk_chars)))

  prose, code = unique_chunks(prose_documents()), unique_chunks(source_documents())
  if not prose or not code:
    raise RuntimeError(f"the standard library gave {len(prose)} prose and {len(code)} code chunks; the demo "
                       "needs both (is this Python installation stripped of its .py sources or pydoc_data?)")
  return prose, code


def _take(prose: list[str], code: list[str], max_chars: int, rng: random.Random) -> list[str]:
  """Shuffled chunks, half prose and half code by characters, until the next would pass max_chars."""
  prose, code = prose[:], code[:]
  rng.shuffle(prose)
  rng.shuffle(code)
  taken, chars = [], {"prose": 0, "code": 0}
  pools = {"prose": prose, "code": code}
  while any(pools.values()):
    kind = min((k for k in pools if pools[k]), key=lambda k: chars[k])
    if sum(chars.values()) + len(pools[kind][-1]) > max_chars:
      break
    text = pools[kind].pop()
    taken.append(text)
    chars[kind] += len(text)
  return taken


def _held_out(text: str) -> bool:
  """Fixed by the text alone, so a chunk is on the same side of the split for every size and seed."""
  return zlib.crc32(text.encode("utf-8")) % HELD_OUT_EVERY == 0


def general_texts(max_chars: int, seed: int = 0, chunk_chars: int = CHUNK_CHARS) -> list[str]:
  """Documents of at most chunk_chars, about half prose and half Python source, at most max_chars in all
  (fewer if the standard library runs out), in an order and selection fixed by the seed."""
  prose, code = _pools(chunk_chars)
  return _take(list(prose), list(code), max_chars, random.Random(seed))


def general_split(train_chars: int, held_out_chars: int, seed: int = 0,
                  chunk_chars: int = CHUNK_CHARS) -> tuple[list[str], list[str]]:
  """(train, held-out) documents, like `general_texts`, from disjoint chunks: held-out loss then measures
  general text the model has not seen."""
  prose, code = _pools(chunk_chars)
  rng = random.Random(seed)
  train = _take([c for c in prose if not _held_out(c)], [c for c in code if not _held_out(c)], train_chars, rng)
  held_out = _take([c for c in prose if _held_out(c)], [c for c in code if _held_out(c)], held_out_chars, rng)
  return train, held_out
