"""The settings of a training run: `TrainConfig` (the loop) and `DataConfig` (packing and the split).

Their defaults are ESFT's (configs/base.yaml of the official release) and the single source of the defaults of
`esft-jax train`, which reads them from here. Both refuse a bad value when built, naming the field and its
command-line option, so a run stops before anything is loaded, compiled or written. This module imports no
JAX: `esft-jax --help` reads it.
"""

from __future__ import annotations

import dataclasses
import math

from esft_jax.data.packing import PACKINGS

SCHEDULES = ("constant", "cosine")
ESFT_SEED = 5934875  # the official release's data seed (shuffling, packing, the validation split)


def _require(ok: bool, name: str, value, flag: str | None, requirement: str) -> None:
  """Raises naming the field, its command-line option (None: it has none) and what it must be."""
  if not ok:
    raise ValueError(f"{name}={value!r}" + (f" ({flag})" if flag else "") + f": {requirement}")


def _at_least(config, minimum: int, *names: str) -> None:
  """Each named field is at least `minimum`; its option is the field's name in dashes (`--grad-accum`)."""
  for name in names:
    value = getattr(config, name)
    _require(value >= minimum, name, value, "--" + name.replace("_", "-"), f"must be at least {minimum}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The training loop's settings (`train.trainer.train`)."""
  steps: int = 500
  lr: float = 1e-5  # ESFT's; esft-jax train picks each method's paper rate (optimizer.DEFAULT_LR) unless --lr
  schedule: str = "constant"
  warmup_steps: int = 0
  weight_decay: float = 0.1
  max_grad_norm: float = 1.0
  grad_accum: int = 16  # ESFT's gradient_accumulation_steps: a step averages 16 micro-batches
  eval_every: int = 100
  save_every: int = 100
  log_every: int = 10
  seed: int = 0  # LoRA's initialisation (the other methods start from the checkpoint); esft-jax train sets it
  compute_dtype: str = "bfloat16"
  expert_impl: str = "auto"
  attention_impl: str = "auto"  # esft_jax.model.attention.ATTENTION_IMPLS
  # The most segments (packed documents) a row may hold, the fused attention's static bound: one fits ESFT's
  # packing and unpacked rows; `finetune` sets it from its rows (`most_segments`). Every batch is checked.
  max_segments: int = 1
  remat: bool = False  # recompute each decoder layer in the backward pass (less activation memory)
  max_checkpoints: int = 2
  # What a device may hold, to check the compiled step against before the first step (None: the device's
  # allocator limit, where it reports one).
  device_memory_gib: float | None = None

  def __post_init__(self):
    _at_least(self, 1, "steps", "grad_accum", "eval_every", "save_every", "log_every")
    if self.device_memory_gib is not None:
      _require(math.isfinite(self.device_memory_gib) and self.device_memory_gib > 0, "device_memory_gib",
               self.device_memory_gib, "--device-memory-gib", "must be a positive number of GiB")
    for name in ("max_segments", "max_checkpoints"):  # set by code, not by an option
      _require(getattr(self, name) >= 1, name, getattr(self, name), None, "must be at least 1")
    _at_least(self, 0, "warmup_steps")
    _require(math.isfinite(self.lr) and self.lr >= 0, "lr", self.lr, "--lr", "must be a finite number >= 0")
    _require(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", self.weight_decay,
             "--weight-decay", "must be a finite number >= 0")
    _require(self.max_grad_norm > 0, "max_grad_norm", self.max_grad_norm, None, "must be positive")
    _require(self.schedule in SCHEDULES, "schedule", self.schedule, "--schedule", f"use one of {SCHEDULES}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Defaults are ESFT's configs/base.yaml; `truncate` applies to "documents" and "unpacked" ("esft" always
  cuts the overflowing sample). `seed` drives every random choice of the data: the packing's random
  concatenation, the validation split and the order of the training rows."""
  seq_length: int = 4096
  packing: str = "esft"
  random_concat_ratio: float = 0.2
  truncate: bool = False
  validation_fraction: float = 0.02
  seed: int = ESFT_SEED

  def __post_init__(self):
    _require(self.seq_length >= 2, "seq_length", self.seq_length, "--seq-length",
             "must be at least 2 (a row holds inputs and their next-token targets)")
    _require(self.packing in PACKINGS, "packing", self.packing, "--packing", f"use one of {PACKINGS}")
    _require(0.0 <= self.random_concat_ratio <= 1.0, "random_concat_ratio", self.random_concat_ratio,
             None, "must lie in [0, 1]")
    _require(0.0 <= self.validation_fraction < 1.0, "validation_fraction", self.validation_fraction,
             "--val-fraction", "must lie in [0, 1)")
