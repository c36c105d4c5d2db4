"""Expert selection (ESFT paper eq. 8) and the expert config file that says which experts train.

Per MoE layer: the smallest prefix of experts, by descending score, whose scores sum to at least p. The rule
and the file format follow the official release exactly, so its shipped configs are reproduced bit for bit.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from esft_jax.files import atomic_write_text, read_json

METHODS = ("token", "gate")
PAPER_TOP_P = {"token": 0.2, "gate": 0.1}  # the paper's thresholds, chosen on its Math sweep


def select_experts(summary: dict[str, dict], method: str = "token", top_p: float | None = None, *,
                   train_shared_experts: bool = False, train_non_expert_modules: bool = False,
                   expected_layers: Sequence[int] | None = None) -> dict[str, Any]:
  """ESFT's expert config from a summary.json dict; `top_p` defaults to the paper's value for `method`.

  Per layer, experts are sorted by score rounded to 4 decimals (descending; ties keep the lower id first) and
  taken while the running sum is below p, so the expert that crosses p is included. With p = 1 that keeps
  taking zero-score experts whenever the rounded scores sum to less than 1 (always for gate scores).
  Without `expected_layers`, the summary's layers must be contiguous; pass the model's MoE layer ids otherwise."""
  if method not in METHODS:
    raise ValueError(f"score method {method!r} is unknown; use one of {METHODS}")
  if top_p is None:
    top_p = PAPER_TOP_P[method]
  if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p!r} must be a number in (0, 1]: the share of the layer's score to cover")
  key = f"{method}_scores"
  if not isinstance(summary, dict) or not isinstance(summary.get(key), dict):
    raise ValueError(f"the summary has no {key!r} table; pass a summary.json written by the scorer")
  by_layer = {_int_key(layer, f"summary {key!r}: layer"): scores for layer, scores in summary[key].items()}
  _check_layers(sorted(by_layer), expected_layers, f"summary {key!r}")
  experts = {}
  for layer in sorted(by_layer):
    scores, where = by_layer[layer], f"summary {key!r} layer {layer}"
    if not isinstance(scores, dict) or not scores:
      raise ValueError(f"{where}: expected a non-empty {{expert id: score}} table")
    pairs = [(_int_key(e, f"{where}: expert"), _score(s, where, e)) for e, s in scores.items()]
    ranked = sorted(pairs, key=lambda id_score: (-id_score[1], id_score[0]))  # ties: lower id first
    chosen, covered = [], 0.0
    for expert, score in ranked:
      if covered >= top_p:
        break
      chosen.append(expert)
      covered += score
    experts[str(layer)] = chosen
  return {"experts": experts, "shared_experts": bool(train_shared_experts),
          "non_expert_modules": bool(train_non_expert_modules)}


def random_like(config: dict[str, Any], num_experts: int, seed: int) -> dict[str, Any]:
  """The paper's random-experts ablation: as many experts per layer as `config`, drawn uniformly without
  replacement (ids ascending), the same for the same seed. `config` must fit the model's `num_experts`."""
  _check_config(config, "config", num_experts)
  rng = np.random.default_rng(seed)
  layers = sorted(config["experts"], key=int)
  experts = {layer: sorted(int(e) for e in rng.choice(num_experts, len(config["experts"][layer]), replace=False))
             for layer in layers}
  return {**config, "experts": experts}


def write_expert_config(path: str | Path, config: dict[str, Any]):
  """Validates, then writes atomically in the official layout (layer keys in string order, one line)."""
  path = Path(path)
  _check_config(config, str(path))
  text = json.dumps({**config, "experts": dict(sorted((str(layer), ids) for layer, ids in config["experts"].items()))})
  path.parent.mkdir(parents=True, exist_ok=True)
  atomic_write_text(path, text)


def load_expert_config(path: str | Path, num_experts: int | None = None,
                       moe_layer_ids: Sequence[int] | None = None) -> dict[str, Any]:
  """Reads an expert config and checks it against the model: every MoE layer present (the official loader
  needs all of them), no other layer, ids in [0, num_experts), no duplicates."""
  config = read_json(path, "write an expert config with `esft-jax select`")
  _check_config(config, str(path), num_experts, moe_layer_ids)
  return config


def _check_config(config: Any, source: str, num_experts: int | None = None,
                  moe_layer_ids: Sequence[int] | None = None):
  if not isinstance(config, dict) or not isinstance(config.get("experts"), dict):
    raise ValueError(f"{source}: an expert config needs an 'experts' object {{layer: [expert ids]}}")
  for flag in ("shared_experts", "non_expert_modules"):
    if not isinstance(config.get(flag), bool):
      raise ValueError(f"{source}: {flag!r} must be true or false, got {config.get(flag)!r}")
  layers = [_int_key(layer, f"{source}: layer") for layer in config["experts"]]
  if moe_layer_ids is not None:
    unknown = sorted(set(layers) - set(moe_layer_ids))
    missing = sorted(set(moe_layer_ids) - set(layers))
    if unknown:
      raise ValueError(f"{source}: layer {unknown[0]} is not a MoE layer of the model (MoE layers "
                       f"{list(moe_layer_ids)}); the config was made for another model")
    if missing:
      raise ValueError(f"{source}: MoE layers {missing} are missing; list every MoE layer, [] for none")
  for layer, ids in config["experts"].items():
    if not isinstance(ids, list):
      raise ValueError(f"{source}: layer {layer}: expected a list of expert ids, got {ids!r}")
    for e in ids:
      if isinstance(e, bool) or not isinstance(e, int) or e < 0 or (num_experts is not None and e >= num_experts):
        allowed = f"in [0, {num_experts})" if num_experts is not None else "a non-negative integer"
        raise ValueError(f"{source}: layer {layer}: expert id {e!r} is not {allowed}")
    duplicates = sorted({e for e in ids if ids.count(e) > 1})
    if duplicates:
      raise ValueError(f"{source}: layer {layer}: expert ids {duplicates} are listed more than once")


def _check_layers(layers: list[int], expected: Sequence[int] | None, source: str):
  if expected is not None:
    missing, extra = sorted(set(expected) - set(layers)), sorted(set(layers) - set(expected))
    if missing or extra:
      raise ValueError(f"{source}: layers {layers} do not match the expected MoE layers {sorted(expected)} "
                       f"(missing {missing}, unexpected {extra}); score all MoE layers of this model")
  elif not layers:
    raise ValueError(f"{source}: no layers; score the model before selecting experts")
  else:
    gaps = sorted(set(range(layers[0], layers[-1] + 1)) - set(layers))
    if gaps:
      raise ValueError(f"{source}: layers {gaps} are missing between {layers[0]} and {layers[-1]}; pass "
                       "expected_layers if this model's MoE layers are not contiguous")


def _int_key(value: Any, what: str) -> int:
  try:
    number = int(value)
  except (TypeError, ValueError):
    number = None
  if number is None or isinstance(value, bool) or str(number) != str(value) or number < 0:
    raise ValueError(f"{what} {value!r} is not a non-negative integer")
  return number


def _score(value: Any, where: str, expert: Any) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
    raise ValueError(f"{where} expert {expert}: score {value!r} is not a non-negative number")
  return round(float(value), 4)
