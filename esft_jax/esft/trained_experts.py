"""The routed experts ESFT trains, as one value: per MoE layer, the trained expert ids.

It owns everything that depends on which rows of the stacked `[E, D, F]` expert tensors train:
- `rows`: the trained rows, sliced out of the stacks (the trainable tree's expert leaves, fp32 master copies);
- `split` / `join`: the parameters as (the rest, the stacks that get trained rows), so a train step can take the
  stacks as a value of their own that it donates;
- `write_rows`: the trained rows written into those stacks (in place, where the stacks are donated);
- `merge`: the parameters the model runs with, the rows written in by a scatter;
- `rows_by_layer`: the rows as the model takes them where `write_rows` already put them in the stacks
  (`Transformer`'s `trained_rows`): values of their own, which alone get gradients, so no stack-sized gradient is
  made for them.
The model takes it too (`Transformer.trained_experts`): the expert kernels compute weight gradients only for the
trained experts.

Paths are '/'-joined Flax paths, e.g. `layers_3/mlp/experts/gate_proj`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import chex
import jax
import jax.numpy as jnp

from esft_jax.param_roles import role
from esft_jax.paths import get_path, layer_index, leaves_by_path, set_path


@dataclasses.dataclass(frozen=True)
class TrainedExperts:
  """(decoder layer, trained expert ids) pairs, layers ascending, each id once per layer. A layer not listed, or
  listed with no ids, trains no routed expert. Hashable, so models and jitted steps close over it."""
  layers: tuple[tuple[int, tuple[int, ...]], ...] = ()

  def __post_init__(self):
    numbers = [layer for layer, _ in self.layers]
    if numbers != sorted(set(numbers)):
      raise ValueError(f"trained experts: layers {numbers} must be listed once each, ascending")
    for layer, ids in self.layers:
      repeated = sorted({e for e in ids if ids.count(e) > 1})
      if repeated:
        raise ValueError(f"trained experts: layer {layer}: expert ids {repeated} are listed more than once; list "
                         "each trained expert once")

  @classmethod
  def from_mapping(cls, experts: Mapping[Any, Any]) -> TrainedExperts:
    """From {layer: ids} with keys and ids as ints or strings (ESFT's expert-config JSON)."""
    return cls(tuple(sorted((int(layer), tuple(int(e) for e in ids)) for layer, ids in experts.items())))

  def of_layer(self, layer: int) -> tuple[int, ...]:
    return dict(self.layers).get(layer, ())

  def has_rows(self, path: str) -> bool:
    """A routed-expert stack of a layer with trained experts: the stacks that get trained rows."""
    return role(path).kind == "routed_experts" and bool(self.of_layer(layer_index(path)))

  def rows(self, params, dtype=jnp.float32) -> dict:
    """The trained rows of every stack that has some, as `dtype`, in a tree shaped like `params`. Layers with no
    trained expert get no (zero-size) leaf: nothing to train, and orbax cannot save one."""
    out: dict = {}
    for path, stack in leaves_by_path(params).items():
      if self.has_rows(path):
        set_path(out, path, stack[self._ids(path)].astype(dtype))
    return out

  def split(self, params) -> tuple[dict, dict]:
    """(rest, stacks): `stacks` holds every stack that gets trained rows, at its path, and `rest` the others."""
    rest = jax.tree_util.tree_map(lambda x: x, params)  # new containers; leaves shared, not copied
    stacks: dict = {}
    for path in leaves_by_path(params):
      if self.has_rows(path):
        *parents, last = path.split("/")
        set_path(stacks, path, get_path(rest, "/".join(parents)).pop(last))
    return rest, stacks

  @staticmethod
  def join(rest, stacks) -> dict:
    """The inverse of `split`."""
    params = jax.tree_util.tree_map(lambda x: x, rest)
    for path, stack in leaves_by_path(stacks).items():
      set_path(params, path, stack)
    return params

  def write_rows(self, stacks, trainable) -> dict:
    """`stacks` (from `split`) with the trained rows of `trainable` written in, as the stacks' dtype; on donated
    stacks XLA writes the rows in place."""
    out: dict = {}
    for path, stack in leaves_by_path(stacks).items():
      set_path(out, path, _scatter(stack, self._rows_of(path, trainable, stack), self._ids(path)))
    return out

  def merge(self, params, trainable) -> dict:
    """`params` with the trained rows of `trainable` in their stacks, differentiable in the rows."""
    merged = jax.tree_util.tree_map(lambda x: x, params)  # new containers; leaves shared, not copied
    for path, stack in leaves_by_path(params).items():
      if self.has_rows(path):
        set_path(merged, path, _scatter(stack, self._rows_of(path, trainable, stack), self._ids(path)))
    return merged

  def rows_by_layer(self, params, trainable) -> dict[int, dict[str, jax.Array]]:
    """The trained rows of `trainable` as the model takes them (`Transformer`'s `trained_rows`) where the stacks
    of `params` hold them already (`write_rows`): {layer: {stack name: rows}}, as the stacks' dtype."""
    out: dict = {}
    for path, stack in leaves_by_path(params).items():
      if self.has_rows(path):
        out.setdefault(layer_index(path), {})[path.rsplit("/", 1)[1]] = self._rows_of(path, trainable, stack)
    return out

  def _ids(self, path: str) -> jax.Array:
    return jnp.asarray(self.of_layer(layer_index(path)), jnp.int32)

  def _rows_of(self, path: str, trainable, stack_ExDxF) -> jax.Array:
    """The trained rows at `path` as the stack's dtype, one per trained expert: rows from another selection would
    otherwise be broadcast into the stack (one row written to every id) or fail inside the scatter."""
    rows_SxDxF = get_path(trainable, path)
    selected = self.of_layer(layer_index(path))
    chex.assert_shape(rows_SxDxF, (len(selected), *stack_ExDxF.shape[1:]),
                      custom_message=f"trained rows of {path} for experts {list(selected)}")
    return rows_SxDxF.astype(stack_ExDxF.dtype)


def _scatter(stack_ExDxF, rows_SxDxF, ids_S):
  # Unique ids (TrainedExperts rejects repeats): differentiating a scatter that may repeat an index would scatter a
  # full-size id tensor to find which update wins.
  return stack_ExDxF.at[ids_S].set(rows_SxDxF, unique_indices=True)
