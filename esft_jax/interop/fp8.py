"""FP8 block-scaled checkpoints (DeepSeek-V3's release) read directly, dequantized as they are read.

DeepSeek-V3 stores its linear weights as float8_e4m3fn, each `NAME.weight` [out, in] with a float32
`NAME.weight_scale_inv` [ceil(out / b0), ceil(in / b1)] for the blocks of `quantization_config.weight_block_size`
[b0, b1] (the last block of a dimension may be partial). The weight is `fp8 * scale_inv` per block, computed in
float32 and rounded once to the target dtype, as DeepSeek's `weight_dequant` kernel (inference/kernel.py) does
for `fp8_cast_bf16.py`. Embeddings, norms, the router and the LM head carry no scale and stay as stored.

`dequantized_entry` returns a lazy view: indexing it dequantizes only the rows and columns asked for, so a
sharded load dequantizes each device's shard alone and the model never exists in bf16 on one host.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import ml_dtypes
import numpy as np

from esft_jax.interop.safetensors_io import CheckpointReader

FP8_DTYPES = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))
SCALE_SUFFIX = "_scale_inv"
# What DeepSeek's fp8_cast_bf16.py writes, and what a load with dtype=None gives an FP8 tensor.
DEQUANTIZED_DTYPE = np.dtype(ml_dtypes.bfloat16)


def scale_name(weight_name: str) -> str:
  """The block-scale tensor of an FP8 weight (`...proj.weight` -> `...proj.weight_scale_inv`)."""
  return weight_name + SCALE_SUFFIX


def weight_block_size(hf_config: dict[str, Any], reader: CheckpointReader,
                      config_path: Path) -> tuple[int, int] | None:
  """[b0, b1] of config.json's FP8 `quantization_config`, or None for an unquantized checkpoint. Refuses other
  quantization methods, malformed block sizes and scale tensors without the config that explains them."""
  quant = hf_config.get("quantization_config")
  if not quant:
    scales = [k for k in reader.keys() if k.endswith(SCALE_SUFFIX)]
    if scales:
      raise ValueError(f"{reader.file_of(scales[0])}: {scales[0]} is an FP8 block scale but {config_path} has no "
                       "quantization_config; add DeepSeek's ({'quant_method': 'fp8', 'weight_block_size': "
                       "[128, 128]}) or use the checkpoint's own config.json")
    return None
  method = quant.get("quant_method")
  if method != "fp8":
    raise ValueError(f"{config_path}: quantization_config.quant_method {method!r} is not supported; esft-jax reads "
                     "'fp8' block-scaled checkpoints (DeepSeek-V3's); dequantize others to bf16 first")
  block = quant.get("weight_block_size")
  if (not isinstance(block, list) or len(block) != 2
      or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
    raise ValueError(f"{config_path}: quantization_config.weight_block_size {block!r} must be two positive "
                     "integers [rows, columns] (DeepSeek-V3: [128, 128])")
  return block[0], block[1]


class DequantizedView:
  """A lazy Flax-layout view of FP8 block-scaled HF weights: one [out, in] tensor (`stacked=False`) or one per
  expert ([E, ...]), transposed to [in, out] where `transposed`. `view[index]` dequantizes just that slice;
  `np.asarray(view)` the whole of it. Supports what a loader asks of a numpy array: shape, dtype, astype,
  indexing with a tuple of slices."""

  def __init__(self, sources: Sequence[tuple[np.ndarray, np.ndarray]], block: tuple[int, int], stacked: bool,
               transposed: bool, dtype: Any = DEQUANTIZED_DTYPE):
    self.sources, self.block, self.stacked, self.transposed = list(sources), block, stacked, transposed
    self.dtype = np.dtype(dtype)
    out_dim, in_dim = self.sources[0][0].shape
    matrix = (in_dim, out_dim) if transposed else (out_dim, in_dim)
    self.shape = (len(self.sources), *matrix) if stacked else matrix
    self.ndim = len(self.shape)

  def astype(self, dtype: Any, copy: bool = True) -> DequantizedView:
    del copy  # a view computes its values when indexed: nothing to copy
    return DequantizedView(self.sources, self.block, self.stacked, self.transposed, dtype)

  def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
    index = tuple(index) + (slice(None),) * (self.ndim - len(tuple(index)))
    if not all(isinstance(i, slice) and i.step in (None, 1) for i in index):
      raise TypeError(f"a dequantized view is indexed by unit-step slices, not {index}")
    experts = range(*index[0].indices(self.shape[0])) if self.stacked else [0]
    rows, cols = index[-2:]
    if self.transposed:
      rows, cols = cols, rows
    out = np.stack([self._dequantize(*self.sources[e], rows, cols) for e in experts])
    if self.transposed:
      out = np.swapaxes(out, 1, 2)
    return out if self.stacked else out[0]

  def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
    del copy
    return (self if dtype is None else self.astype(dtype))[(slice(None),) * self.ndim]

  def _dequantize(self, weight: np.ndarray, scale: np.ndarray, rows: slice, cols: slice) -> np.ndarray:
    r0, r1, _ = rows.indices(weight.shape[0])
    c0, c1, _ = cols.indices(weight.shape[1])
    scale_RxC = scale[np.arange(r0, r1)[:, None] // self.block[0], np.arange(c0, c1)[None, :] // self.block[1]]
    return (weight[r0:r1, c0:c1].astype(np.float32) * scale_RxC).astype(self.dtype)


def refuse_unscaled(array: np.ndarray, reader: CheckpointReader, name: str) -> None:
  """An FP8 tensor read without its block scale is an error: its raw values are not the weights."""
  if array.dtype in FP8_DTYPES:
    where = reader.file_of(name) if name in reader else reader.dir
    raise ValueError(f"{where}: {name} is FP8 without a block scale ({scale_name(name)}) or an FP8 "
                     "quantization_config in config.json; esft-jax cannot tell its real values")


def _source(reader: CheckpointReader, name: str, hf_shape: tuple[int, int],
            block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  weight = reader.get(name, hf_shape)
  if weight.dtype not in FP8_DTYPES:
    raise ValueError(f"{reader.file_of(name)}: {name} has a block scale ({scale_name(name)}) but dtype "
                     f"{weight.dtype}, not FP8; the checkpoint's tensors and scales disagree")
  grid = tuple(math.ceil(d / b) for d, b in zip(hf_shape, block))
  scale = reader.get(scale_name(name))
  if tuple(scale.shape) != grid:
    raise ValueError(f"{reader.file_of(scale_name(name))}: {scale_name(name)} has shape {tuple(scale.shape)}, "
                     f"expected {grid} for a {hf_shape} weight in {block[0]}x{block[1]} blocks "
                     "(quantization_config.weight_block_size)")
  return weight, scale.astype(np.float32)


def dequantized_entry(reader: CheckpointReader, hf_names: tuple[str, ...], kind: str, shape: tuple[int, ...],
                      block: tuple[int, int] | None) -> DequantizedView | None:
  """The lazy dequantized view of one parameter (`kind` and `shape` as `esft_jax.interop.hf.Entry` and the Flax
  tree give them), or None where its tensors are not block-scaled (`refuse_unscaled` then checks what is read)."""
  scaled = [n for n in hf_names if n in reader and scale_name(n) in reader]
  if block is None or not scaled:
    return None
  if len(scaled) != len(hf_names):
    unscaled = next(n for n in hf_names if n not in scaled)
    where = reader.file_of(unscaled) if unscaled in reader else reader.dir
    raise ValueError(f"{where}: {unscaled} has no block scale ({scale_name(unscaled)}) while {scaled[0]} has one; "
                     "esft-jax reads a parameter whose tensors are all FP8 block-scaled or none")
  if kind == "experts":
    _, in_dim, out_dim = shape
    sources = [_source(reader, n, (out_dim, in_dim), block) for n in hf_names]
    return DequantizedView(sources, block, stacked=True, transposed=True)
  matrix = shape[::-1] if kind == "linear" else shape
  if len(matrix) != 2:
    raise ValueError(f"{reader.file_of(hf_names[0])}: {hf_names[0]} is block-scaled but has {len(matrix)} "
                     "dimensions; FP8 block scales apply to matrices")
  return DequantizedView([_source(reader, hf_names[0], tuple(matrix), block)], block, stacked=False,
                         transposed=kind == "linear")
