"""Lazy safetensors reading (memory-mapped, one tensor at a time) and atomic writing, bf16 and fp8 included.

The format is 8 bytes of little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then the raw bytes. We parse it ourselves so that bf16 reads as `ml_dtypes.bfloat16` numpy views without
copying the file, and so every error can name the file and the tensor.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

from esft_jax.files import atomic_open, atomic_write_text

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class SafetensorsFile:
  """One .safetensors file, memory-mapped; `get` returns a read-only numpy view of one tensor."""

  def __init__(self, path: str | Path):
    self.path = Path(path)
    if not self.path.exists():
      raise FileNotFoundError(f"{self.path}: safetensors file not found")
    size = self.path.stat().st_size
    with open(self.path, "rb") as f:
      raw = f.read(8)
      if len(raw) < 8:
        raise ValueError(f"{self.path}: truncated safetensors file ({size} bytes); re-download or re-save it")
      (header_len,) = struct.unpack("<Q", raw)
      if 8 + header_len > size:
        raise ValueError(f"{self.path}: truncated safetensors header ({size} bytes for a {header_len}-byte "
                         "header); re-download or re-save it")
      try:
        header = json.loads(f.read(header_len))
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{self.path}: corrupt safetensors header ({e})") from None
    self.metadata = header.pop("__metadata__", {}) or {}
    self._entries = header
    self._data_start = 8 + header_len
    for name, entry in header.items():
      if entry["dtype"] not in DTYPES:
        raise ValueError(f"{self.path}: tensor {name!r} has dtype {entry['dtype']} which esft-jax cannot read")
      end = entry["data_offsets"][1]
      if self._data_start + end > size:
        raise ValueError(f"{self.path}: truncated: tensor {name!r} ends at byte {self._data_start + end} but the "
                         f"file has {size} bytes; re-download or re-save it")
    self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)

  def keys(self) -> list[str]:
    return list(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._entries[name]["shape"])

  def dtype(self, name: str) -> np.dtype:
    return DTYPES[self._entries[name]["dtype"]]

  def get(self, name: str) -> np.ndarray:
    entry = self._entries[name]
    start, end = entry["data_offsets"]
    dtype = DTYPES[entry["dtype"]]
    raw = self._mmap[self._data_start + start:self._data_start + end]
    return raw.view(dtype).reshape(entry["shape"])


class CheckpointReader:
  """All tensors of an HF model directory: `model.safetensors` or a sharded index."""

  def __init__(self, model_dir: str | Path):
    self.dir = Path(model_dir)
    index = self.dir / INDEX_FILE
    if index.exists():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{index}: not a safetensors index (needs a 'weight_map'): {e}") from None
      files = {f: SafetensorsFile(self.dir / f) for f in sorted(set(weight_map.values()))}
      self._where = {}
      for name, file in weight_map.items():
        if name not in files[file]:
          raise ValueError(f"{index}: lists tensor {name!r} in {file}, which does not contain it")
        self._where[name] = files[file]
    elif (self.dir / SINGLE_FILE).exists():
      single = SafetensorsFile(self.dir / SINGLE_FILE)
      self._where = {name: single for name in single.keys()}
    else:
      raise FileNotFoundError(f"{self.dir}: no {SINGLE_FILE} or {INDEX_FILE}; esft-jax reads safetensors "
                              "checkpoints (convert .bin files with transformers' save_pretrained)")

  def keys(self) -> list[str]:
    return list(self._where)

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def file_of(self, name: str) -> Path:
    return self._where[name].path

  def dtype(self, name: str) -> np.dtype:
    """The stored dtype, read from the header (no tensor data is touched)."""
    return self._where[name].dtype(name)

  def get(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    if name not in self._where:
      raise KeyError(f"{self.dir}: tensor {name!r} is missing from the checkpoint")
    array = self._where[name].get(name)
    if shape is not None and tuple(array.shape) != tuple(shape):
      raise ValueError(f"{self.file_of(name)}: tensor {name!r} has shape {tuple(array.shape)}, expected "
                       f"{tuple(shape)} from config.json; the checkpoint and its config disagree")
    return array


def write_safetensors(path: str | Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None):
  """Writes one file atomically (temporary name, then rename)."""
  path = Path(path)
  header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  arrays = {}
  for name, array in tensors.items():
    array = np.ascontiguousarray(array)
    if array.dtype not in DTYPE_NAMES:
      raise ValueError(f"{path}: tensor {name!r} has dtype {array.dtype} which safetensors cannot store")
    header[name] = {"dtype": DTYPE_NAMES[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    offset += array.nbytes
    arrays[name] = array
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # keeps tensor data 8-byte aligned, as the reference writer does
  with atomic_open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for array in arrays.values():
      f.write(array.tobytes())


def write_checkpoint(model_dir: str | Path, tensors: Iterable[tuple[str, np.ndarray]],
                     max_shard_bytes: int = 5 * 2**30) -> list[Path]:
  """Writes `model.safetensors`, or shards plus `model.safetensors.index.json` above `max_shard_bytes`."""
  model_dir = Path(model_dir)
  model_dir.mkdir(parents=True, exist_ok=True)
  shards: list[dict[str, np.ndarray]] = [{}]
  sizes = [0]
  for name, array in tensors:
    if sizes[-1] and sizes[-1] + array.nbytes > max_shard_bytes:
      shards.append({})
      sizes.append(0)
    shards[-1][name] = array
    sizes[-1] += array.nbytes
  if len(shards) == 1:
    write_safetensors(model_dir / SINGLE_FILE, shards[0])
    return [model_dir / SINGLE_FILE]
  names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  for name, shard in zip(names, shards):
    write_safetensors(model_dir / name, shard)
  index = {"metadata": {"total_size": sum(sizes)},
           "weight_map": {t: name for name, shard in zip(names, shards) for t in shard}}
  atomic_write_text(model_dir / INDEX_FILE, json.dumps(index, indent=2))
  return [model_dir / n for n in names]
