"""Parameter paths: '/'-joined Flax tree keys (`layers_3/mlp/experts/gate_proj`), the handle every
selection rule (trainable, LoRA targets, weight decay, sharding) works on."""

from __future__ import annotations

from typing import Any, Mapping

import jax


def leaves_by_path(tree) -> dict[str, Any]:
  return {"/".join(str(k.key) for k in kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def set_path(tree: dict, path: str, value) -> None:
  *parents, last = path.split("/")
  for key in parents:
    tree = tree.setdefault(key, {})
  tree[last] = value


def get_path(tree: Mapping, path: str):
  for key in path.split("/"):
    tree = tree[key]
  return tree


def layer_index(path: str) -> int:
  """The decoder layer of a path under `layers_{i}/`."""
  return int(path.split("/", 1)[0].removeprefix("layers_"))
