"""The trained-experts value (split, join, row writes, merge) and the parameter-role table."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esft_jax.config import config_from_hf, load_config
from esft_jax.esft.trainable import plan_from_expert_config
from esft_jax.esft.trained_experts import TrainedExperts
from esft_jax.model.transformer import init_params
from esft_jax.param_roles import role
from esft_jax.paths import leaves_by_path
from tests.hf_models import ARCHITECTURES

TRAINED = TrainedExperts(((1, (3, 0)), (2, (5,))))


def _params():
  return init_params(config_from_hf(ARCHITECTURES["deepseek_v2"]().to_dict()), jax.random.key(0))


def _moved_rows(params, seed=1):
  rng = np.random.default_rng(seed)
  rows = TRAINED.rows(params)
  return jax.tree_util.tree_map(lambda x: x + jnp.asarray(rng.standard_normal(x.shape), x.dtype), rows)


def test_split_holds_the_stacks_with_trained_rows_and_join_restores_the_tree():
  params = _params()
  rest, stacks = TRAINED.split(params)
  assert sorted(leaves_by_path(stacks)) == sorted(f"layers_{layer}/mlp/experts/{proj}" for layer in (1, 2)
                                                  for proj in ("down_proj", "gate_proj", "up_proj"))
  assert not any(path.startswith(("layers_1/mlp/experts", "layers_2/mlp/experts")) for path in leaves_by_path(rest))
  joined = TrainedExperts.join(rest, stacks)
  assert jax.tree_util.tree_structure(joined) == jax.tree_util.tree_structure(params)
  chex.assert_trees_all_equal(joined, params)


def test_written_rows_equal_a_reference_scatter_and_the_merge_and_the_rows_the_model_takes():
  params = _params()
  rows = _moved_rows(params)
  _, stacks = TRAINED.split(params)
  written = leaves_by_path(TRAINED.write_rows(stacks, rows))
  merged = leaves_by_path(TRAINED.merge(params, rows))
  by_layer = TRAINED.rows_by_layer(jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params), rows)
  assert {layer: sorted(stacks) for layer, stacks in by_layer.items()} == {
      layer: ["down_proj", "gate_proj", "up_proj"] for layer in (1, 2)}
  for path, stack in leaves_by_path(stacks).items():
    ids = list(TRAINED.of_layer(int(path[7])))
    want = np.array(stack)
    want[ids, ...] = np.asarray(leaves_by_path(rows)[path])
    np.testing.assert_array_equal(written[path], want)
    np.testing.assert_array_equal(merged[path], want)
    model_rows = by_layer[int(path[7])][path.rsplit("/", 1)[1]]
    assert model_rows.dtype == jnp.bfloat16  # the stacks' dtype
    np.testing.assert_array_equal(model_rows, want[ids].astype(jnp.bfloat16))


def test_rows_sliced_at_init_write_back_to_the_same_stacks():
  params = _params()
  _, stacks = TRAINED.split(params)
  chex.assert_trees_all_equal(TRAINED.write_rows(stacks, TRAINED.rows(params)), stacks)


def test_repeated_expert_ids_and_layers_are_rejected():
  with pytest.raises(ValueError, match=r"layer 1: expert ids \[3\] are listed more than once"):
    TrainedExperts(((1, (3, 0, 3)),))
  with pytest.raises(ValueError, match=r"expert config: trained experts: layer 2: expert ids \[5\]"):
    plan_from_expert_config({"experts": {"2": [5, 5]}})
  with pytest.raises(ValueError, match=r"layers \[2, 1\] must be listed once each, ascending"):
    TrainedExperts(((2, (0,)), (1, (0,))))


def test_rows_of_another_selection_are_rejected():
  """Rows for fewer experts than selected would be broadcast into the stack; the shape check names them."""
  params = _params()
  _, stacks = TRAINED.split(params)
  fewer = TrainedExperts(((1, (3,)), (2, (5,)))).rows(params)
  with pytest.raises(AssertionError, match=r"trained rows of layers_1/mlp/experts/\w+ for experts \[3, 0\]"):
    TRAINED.write_rows(stacks, fewer)
  with pytest.raises(AssertionError, match=r"trained rows of layers_1/mlp/experts/\w+ for experts \[3, 0\]"):
    TRAINED.rows_by_layer(params, fewer)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_parameter_of_each_architecture_has_a_role(name):
  shapes = jax.eval_shape(lambda: init_params(config_from_hf(ARCHITECTURES[name]().to_dict()), jax.random.key(0)))
  roles = {path: role(path) for path in leaves_by_path(shapes)}
  for path, found in roles.items():  # the table agrees with the layout the model writes
    assert (found.kind == "routed_experts") == ("/mlp/experts/" in path), path
    assert (found.kind == "router_bias") == path.endswith("/e_score_correction_bias"), path
    assert found.decayed == (not re.search(r"/(scale|bias)$", path) and found.kind != "router_bias"), path


def test_lora_factors_take_their_parameters_role():
  assert role("layers_1/mlp/experts/gate_proj/lora_a") == role("layers_1/mlp/experts/gate_proj")
  assert role("layers_0/self_attn/q_proj/kernel/lora_b").lora_target
  assert not role("layers_0/mlp/gate/kernel").lora_target and not role("lm_head/kernel").lora_target


def test_a_parameter_no_row_names_is_an_error_naming_it():
  with pytest.raises(ValueError, match=r"parameter 'layers_0/mlp/new_module/weight' matches no row"):
    role("layers_0/mlp/new_module/weight")
  shapes = jax.eval_shape(lambda: init_params(load_config("tiny-deepseek"), jax.random.key(0)))
  # the presets' parameters are covered too
  assert {role(path).kind for path in leaves_by_path(shapes)} == {"routed_experts", "shared_experts", "non_expert"}
