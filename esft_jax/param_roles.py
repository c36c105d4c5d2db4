"""The one table of what every parameter is: its role in ESFT's vocabulary, whether LoRA adapts it and whether
weight decay applies to it.

Rows of (pattern, role) over '/'-joined Flax paths (`layers_3/mlp/experts/gate_proj`); a path takes the role of
the first row whose pattern matches it whole. There is no catch-all row: a parameter no row names is an error
that names it, so a new module gets a role decided here instead of a default. Trainable-tree paths of LoRA
factors (`.../kernel/lora_a`) take the role of the parameter they adapt.

Read by `esft_jax.esft.trainable` (what trains), `esft_jax.lora` (what LoRA adapts), `esft_jax.train.optimizer`
(the decay mask and the frozen label) and `esft_jax.sharding` (how trainable leaves shard).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Iterable

KINDS = ("routed_experts", "shared_experts", "router_bias", "non_expert")


@dataclasses.dataclass(frozen=True)
class Role:
  """`kind`: routed experts, shared experts, the router's score-correction bias (a statistic, never trained by
  gradient), or a non-expert module (attention, norms, embeddings, head, routers, dense MLPs). `lora_target`:
  LoRA adapts it (every linear map except the embedding, the head and the routers, which are not linear modules
  in transformers either; routed experts per expert). `decayed`: AdamW's weight decay applies (not to norm
  scales and biases, as transformers' Trainer)."""
  kind: str
  lora_target: bool
  decayed: bool

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"parameter role {self.kind!r} is unknown; use one of {KINDS}")


_LAYER = r"layers_\d+"

PARAM_ROLES: tuple[tuple[str, Role], ...] = (
    (rf"{_LAYER}/mlp/experts/(gate|up|down)_proj", Role("routed_experts", lora_target=True, decayed=True)),
    (rf"{_LAYER}/mlp/shared_experts/(gate|up|down)_proj/kernel", Role("shared_experts", True, True)),
    (rf"{_LAYER}/mlp/shared_expert_gate/kernel", Role("shared_experts", True, True)),
    # Labelled frozen by the optimizer, so it is neither decayed nor adapted.
    (rf"{_LAYER}/mlp/e_score_correction_bias", Role("router_bias", False, False)),
    (rf"{_LAYER}/mlp/gate/kernel", Role("non_expert", False, True)),  # the router
    (rf"{_LAYER}/(self_attn/\w+|mlp/(gate|up|down)_proj)/kernel", Role("non_expert", True, True)),
    (r"(layers_\d+/)?(\w+/)+(scale|bias)", Role("non_expert", False, False)),  # norms, attention biases
    (r"embed_tokens|lm_head/kernel", Role("non_expert", False, True)),
)

_COMPILED = tuple((re.compile(pattern), role) for pattern, role in PARAM_ROLES)
_LORA_FACTOR = re.compile(r"/lora_[ab]$")


@functools.lru_cache(maxsize=None)
def role(path: str) -> Role:
  """The role of the parameter at `path` (or of the parameter a LoRA factor at `path` adapts)."""
  param = _LORA_FACTOR.sub("", path)
  for pattern, found in _COMPILED:
    if pattern.fullmatch(param):
      return found
  raise ValueError(f"parameter {param!r} matches no row of esft_jax.param_roles.PARAM_ROLES, so whether it "
                   "trains, is adapted by LoRA or is decayed is undecided; add a row for it")


def check_covered(paths: Iterable[str]) -> None:
  """Every path has a role; the first that has none is named."""
  for path in paths:
    role(path)
