"""What trains, for every method: one labelling rule over parameter paths, and the trainable tree.

The trainer holds two trees (levanter's partition, decided once): the frozen model parameters, and a small
trainable tree that alone gets gradients and optimizer state. For ESFT the trainable tree holds, per MoE
layer, only the selected experts' rows of the stacked `[E, D, F]` tensors (the "trainable expert slice");
`merge_trainable` writes them back into the frozen stack inside the jitted step (the train step writes them in
place into stacks it is handed apart and donated, `split_written`, so no stack is copied). So gradients and
AdamW state exist only for what is trained, and every frozen parameter stays bit-identical.

Paths are '/'-joined Flax paths, e.g. `layers_3/mlp/experts/gate_proj`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import chex
import jax
import jax.numpy as jnp

from esft_jax import lora
from esft_jax.config import ModelConfig
from esft_jax.model.experts import rows_already_in
from esft_jax.paths import get_path, leaves_by_path, set_path

METHODS = ("esft", "fft", "lora")
ROLES = ("routed_experts", "shared_experts", "router_bias", "non_expert")


def param_role(path: str) -> str:
  """The role of a parameter in ESFT's vocabulary: routed experts, shared experts, the router's
  score-correction bias (a statistic, never trained by gradient), or a non-expert module (attention, norms,
  embeddings, head, routers, dense MLPs)."""
  if "/mlp/experts/" in path:
    return "routed_experts"
  if "/mlp/shared_experts/" in path or "/mlp/shared_expert_gate/" in path:
    return "shared_experts"
  if path.endswith("/e_score_correction_bias"):
    return "router_bias"
  return "non_expert"


def layer_index(path: str) -> int:
  return int(path.split("/", 1)[0].removeprefix("layers_"))


@dataclasses.dataclass(frozen=True)
class TrainPlan:
  """Which parameters train. Hashable, so jitted steps can close over it."""
  method: str
  experts: tuple[tuple[int, tuple[int, ...]], ...] = ()  # ESFT: (decoder layer, selected expert ids)
  shared_experts: bool = False
  non_expert_modules: bool = False
  lora_rank: int = 8
  lora_scale: float = 2.0

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"training method {self.method!r} is unknown; use one of {METHODS}")

  @property
  def expert_ids(self) -> dict[int, tuple[int, ...]]:
    return dict(self.experts)

  def trains_whole(self, path: str) -> bool:
    """True where the whole leaf is trainable (FFT, or an ESFT flag covers its role)."""
    role = param_role(path)
    if role == "router_bias" or self.method == "lora":
      return False
    if self.method == "fft":
      return True
    return (role == "shared_experts" and self.shared_experts) or (role == "non_expert" and self.non_expert_modules)


def plan_from_expert_config(expert_config: Mapping[str, Any]) -> TrainPlan:
  """ESFT's expert-config JSON ({"experts": {layer: ids}, "shared_experts", "non_expert_modules"})."""
  experts = tuple(sorted((int(layer), tuple(int(e) for e in ids))
                         for layer, ids in expert_config["experts"].items()))
  for layer, ids in experts:
    if len(set(ids)) != len(ids):
      raise ValueError(f"expert config: layer {layer}: expert ids {sorted({e for e in ids if ids.count(e) > 1})} "
                       "are listed more than once; list each trained expert once")
  return TrainPlan("esft", experts, bool(expert_config.get("shared_experts", False)),
                   bool(expert_config.get("non_expert_modules", False)))


def init_trainable(plan: TrainPlan, params, rng: jax.Array | None = None, dtype=jnp.float32) -> dict:
  """The trainable tree, as fp32 master copies: whole leaves, ESFT expert slices, or fresh LoRA factors."""
  if plan.method == "lora":
    return lora.init_lora(params, plan.lora_rank, rng if rng is not None else jax.random.key(0), dtype)
  selected = plan.expert_ids
  trainable: dict = {}
  for path, leaf in leaves_by_path(params).items():
    if plan.trains_whole(path):
      set_path(trainable, path, jnp.array(leaf, dtype=dtype, copy=True))  # never alias the frozen tree
    elif _has_trained_rows(plan, path):
      # Layers with no selected expert get no (zero-size) leaf: nothing to train, and orbax cannot save one.
      ids = jnp.asarray(selected[layer_index(path)], jnp.int32)
      set_path(trainable, path, leaf[ids].astype(dtype))
  return trainable


def merge_trainable(plan: TrainPlan, params, trainable, rows_written: bool = False) -> dict:
  """The full parameter tree the model runs with: frozen parameters with the trainable ones written in.

  `rows_written`: `params` already hold the trained expert rows (`write_expert_rows`, in the train step), so the
  stacks are used as they are, with no full-size copy, and only the rows' gradients flow back."""
  if plan.method == "lora":
    return lora.apply_lora(params, trainable, plan.lora_scale)
  merged = jax.tree_util.tree_map(lambda x: x, params)  # new containers; leaves shared, not copied
  for path, value in leaves_by_path(trainable).items():
    frozen = get_path(params, path)
    if _is_expert_slice(plan, path):
      selected = plan.expert_ids[layer_index(path)]
      rows, ids = _trained_rows(path, value, frozen, selected), jnp.asarray(selected, jnp.int32)
      value = rows_already_in(frozen, rows, ids) if rows_written else _write_rows(frozen, rows, ids)
    set_path(merged, path, value.astype(frozen.dtype))
  return merged


def split_written(plan: TrainPlan, params) -> tuple[dict, dict]:
  """(rest, written): `written` maps the path of every stack the train step writes rows into (ESFT's routed-expert
  stacks of the layers with a selection) to that stack, and `rest` is `params` without them. The step takes
  `written` as an argument of its own that it donates, so the rows are written in place; `join_written` puts
  the trees back together."""
  rest = jax.tree_util.tree_map(lambda x: x, params)  # new containers; leaves shared, not copied
  written = {}
  for path in leaves_by_path(params):
    if _has_trained_rows(plan, path):
      *parents, last = path.split("/")
      written[path] = get_path(rest, "/".join(parents)).pop(last)
  return rest, written


def join_written(rest, written: Mapping[str, Any]) -> dict:
  """The inverse of `split_written`."""
  params = jax.tree_util.tree_map(lambda x: x, rest)
  for path, stack in written.items():
    set_path(params, path, stack)
  return params


def write_expert_rows(plan: TrainPlan, written: Mapping[str, Any], trainable) -> dict:
  """`written` (see `split_written`) with the trained expert rows of `trainable` written in, as the stacks'
  dtype; on a donated `written`, XLA writes the rows in place."""
  out = {}
  for path, stack in written.items():
    selected = plan.expert_ids[layer_index(path)]
    rows = _trained_rows(path, get_path(trainable, path), stack, selected)
    out[path] = _write_rows(stack, rows, jnp.asarray(selected, jnp.int32))
  return out


def _trained_rows(path: str, rows_SxDxF, stack_ExDxF, selected: tuple[int, ...]) -> jax.Array:
  """The trained rows as the stack's dtype, one per selected expert: rows from another plan would otherwise be
  broadcast into the stack (one row written to every id) or fail inside the scatter."""
  chex.assert_shape(rows_SxDxF, (len(selected), *stack_ExDxF.shape[1:]),
                    custom_message=f"trained rows of {path} for experts {list(selected)}")
  return rows_SxDxF.astype(stack_ExDxF.dtype)


def _is_expert_slice(plan: TrainPlan, path: str) -> bool:
  return plan.method == "esft" and param_role(path) == "routed_experts" and not plan.trains_whole(path)


def _has_trained_rows(plan: TrainPlan, path: str) -> bool:
  """An ESFT routed-expert stack of a layer with selected experts (the others have no trainable slice)."""
  return _is_expert_slice(plan, path) and bool(plan.expert_ids.get(layer_index(path)))


def _write_rows(stack_ExDxF, rows_SxDxF, ids_S):
  # Unique ids (the plan rejects repeats): differentiating a scatter that may repeat an index would scatter a
  # full-size id tensor to find which update wins.
  return stack_ExDxF.at[ids_S].set(rows_SxDxF, unique_indices=True)


def expert_weight_grads(plan: TrainPlan, config: ModelConfig) -> tuple[tuple[int, tuple[int, ...]], ...] | None:
  """Per MoE layer, the routed experts whose weight gradients a step uses (`Transformer.expert_weight_grads`):
  ESFT's selected ones, none where a layer has no selection. None (all) for FFT and LoRA."""
  if plan.method != "esft":
    return None
  selected = plan.expert_ids
  return tuple((layer, selected.get(layer, ())) for layer in config.moe_layer_ids)


def validate_plan(plan: TrainPlan, config: ModelConfig, source: str = "expert config") -> None:
  """ESFT plans must name only MoE layers and existing experts."""
  for layer, ids in plan.experts:
    if layer not in config.moe_layer_ids:
      raise ValueError(f"{source}: layer {layer} is not an MoE layer of this model (MoE layers: "
                       f"{config.moe_layer_ids[0]}..{config.moe_layer_ids[-1]})")
    bad = [e for e in ids if not 0 <= e < config.num_experts]
    if bad:
      raise ValueError(f"{source}: layer {layer} names expert {bad[0]}, but the model has {config.num_experts}")


def count_parameters(tree) -> int:
  return sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(tree))


def tree_bytes(tree) -> int:
  return sum(int(leaf.size) * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(tree))
