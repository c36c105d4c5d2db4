"""The ablation configs under configs/ablations/: one frozen dataclass per ablation, read from JSON and checked
before anything runs. An error names the file, the key, the value and what the key takes: unknown and missing
keys, wrong types and values out of range all fail here, not in the middle of a run."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Callable, ClassVar, Union

from esft_jax.demo.tasks import TASK_NAMES
from esft_jax.files import read_json


@dataclasses.dataclass(frozen=True)
class ThresholdConfig:
  """Figure 6: ESFT-Token over `token_p`, ESFT-Gate over `gate_p`, LoRA at `lora_ranks`."""
  ablation: ClassVar[str] = "threshold"
  tasks: tuple[str, ...]
  token_p: tuple[float, ...]
  gate_p: tuple[float, ...]
  lora_ranks: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class WhatToTrainConfig:
  """Table 3: the relevant experts (selected by `score` at `p`) with and without shared experts and non-expert
  modules."""
  ablation: ClassVar[str] = "what_to_train"
  tasks: tuple[str, ...]
  score: str
  p: float


@dataclasses.dataclass(frozen=True)
class RandomExpertsConfig:
  """Table 4: the experts selected by `score` at `p` against as many per layer drawn at random (per seed)."""
  ablation: ClassVar[str] = "random_experts"
  tasks: tuple[str, ...]
  score: str
  p: float


@dataclasses.dataclass(frozen=True)
class GranularityGroupsConfig:
  """Figure 7: the base's experts grouped `group_sizes` at a time; `active_experts` fine experts active per token
  in every grouped model (None: the base's top-k)."""
  ablation: ClassVar[str] = "granularity_groups"
  tasks: tuple[str, ...]
  group_sizes: tuple[int, ...]
  active_experts: int | None = None


@dataclasses.dataclass(frozen=True)
class ScratchVariant:
  """A base of `experts` routed experts sharing the preset's routed width, with shared experts of `shared_width`
  in all (0: none)."""
  experts: int
  shared_width: int


@dataclasses.dataclass(frozen=True)
class GranularityScratchConfig:
  """Bases of other granularity, each pretrained like the demo's."""
  ablation: ClassVar[str] = "granularity_scratch"
  tasks: tuple[str, ...]
  variants: tuple[ScratchVariant, ...]


AblationConfig = Union[ThresholdConfig, WhatToTrainConfig, RandomExpertsConfig, GranularityGroupsConfig,
                       GranularityScratchConfig]
CONFIG_CLASSES = {cls.ablation: cls for cls in typing.get_args(AblationConfig)}
ABLATIONS = tuple(CONFIG_CLASSES)


def _positive(x) -> bool:
  return x >= 1


def _threshold(x) -> bool:
  return 0 < x <= 1


# What each key's values may be: (test, what the key takes), applied to every item of a list.
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tasks": (lambda t: t in TASK_NAMES, f"a task of {list(TASK_NAMES)}"),
    "score": (lambda s: s in ("token", "gate"), "'token' or 'gate' (the routing score that selects the experts)"),
    "p": (_threshold, "a threshold p in (0, 1]"),
    "token_p": (_threshold, "a threshold p in (0, 1]"),
    "gate_p": (_threshold, "a threshold p in (0, 1]"),
    "lora_ranks": (_positive, "a LoRA rank of at least 1"),
    "group_sizes": (_positive, "a group size of at least 1 (1 is the base itself)"),
    "active_experts": (_positive, "at least 1 fine expert active per token"),
    "experts": (_positive, "at least 1 routed expert"),
    "shared_width": (lambda w: w >= 0, "a shared width of at least 0 (0: no shared expert)"),
}

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string"}


class AblationConfigError(ValueError):
  """A config that cannot run, with the file, key and value named."""


def load_ablation_config(path: str | Path) -> AblationConfig:
  """The typed config in `path`; AblationConfigError on anything it cannot run."""
  raw = read_json(path, "see configs/ablations/ for the ablation configs")
  example = "see configs/ablations/ for one of each"
  if not isinstance(raw, dict):
    raise AblationConfigError(f"{path}: the config must be a JSON object of keys, got {type(raw).__name__}; "
                              f"{example}")
  name = raw.get("ablation")
  if name not in CONFIG_CLASSES:
    raise AblationConfigError(f"{path}: 'ablation' must be one of {list(ABLATIONS)}, got {name!r}; {example}")
  fields = {k: v for k, v in raw.items() if k != "ablation"}
  return _parse(CONFIG_CLASSES[name], fields, f"{path}", f"configs/ablations/{name}.json")


def config_json(config: AblationConfig) -> dict:
  """The config as its JSON file holds it."""
  return {"ablation": config.ablation, **dataclasses.asdict(config)}


def _parse(cls, raw: dict, where: str, example: str):
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  what = f"a {cls.ablation} config" if hasattr(cls, "ablation") else f"each {cls.__name__}"
  unknown = sorted(set(raw) - set(fields))
  if unknown:
    hint = " (the seeds are the command's --seed)" if "seeds" in unknown else ""
    raise AblationConfigError(f"{where}: unknown key {unknown[0]!r}{hint}; {what} takes "
                              f"{['ablation'] * hasattr(cls, 'ablation') + list(fields)}, as {example} shows")
  missing = [name for name, f in fields.items() if name not in raw and f.default is dataclasses.MISSING]
  if missing:
    raise AblationConfigError(f"{where}: missing key {missing[0]!r}; {what} needs {list(fields)}, as {example} "
                              "shows")
  return cls(**{name: _value(hints[name], raw[name], f"{where}: {name!r}", name, example) for name in raw})


def _value(kind, value, where: str, key: str, example: str):
  """`value` as `kind` (int, float, str, a tuple of one of them or of a dataclass, optionally None), its items
  in `_RANGES[key]`."""
  origin = typing.get_origin(kind)
  if origin in (Union, types.UnionType):
    if value is None:
      return None
    kind = next(k for k in typing.get_args(kind) if k is not type(None))
    origin = typing.get_origin(kind)
  if origin is tuple:
    item_kind = typing.get_args(kind)[0]
    if not isinstance(value, list) or not value:
      raise AblationConfigError(f"{where} must be a non-empty list, got {value!r}; see {example}")
    items = tuple(_value(item_kind, v, f"{where} item {i}", key, example) for i, v in enumerate(value))
    repeated = sorted({str(v) for v in items if items.count(v) > 1})
    if repeated:
      raise AblationConfigError(f"{where} lists {repeated[0]} more than once; list each value once")
    return items
  if dataclasses.is_dataclass(kind):
    if not isinstance(value, dict):
      raise AblationConfigError(f"{where} must be an object with keys {[f.name for f in dataclasses.fields(kind)]}"
                                f", got {value!r}; see {example}")
    return _parse(kind, value, where, example)
  if not _is(kind, value):
    raise AblationConfigError(f"{where} must be {_TYPE_NAMES[kind]}, got {value!r}; see {example}")
  value = kind(value)
  test, takes = _RANGES.get(key, (lambda _: True, ""))
  if not test(value):
    raise AblationConfigError(f"{where} is {value!r}, out of range: it must be {takes}")
  return value


def _is(kind, value) -> bool:
  if isinstance(value, bool):
    return False
  if kind is float:
    return isinstance(value, (int, float)) and math.isfinite(value)
  return isinstance(value, kind)
