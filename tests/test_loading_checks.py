"""What loading a checkpoint refuses: tensors its config.json does not use (but not the ones models rightly carry
unused), and, when asked, NaN or infinite values, named tensor by tensor."""

import json

import numpy as np
import pytest

from esft_jax.config import config_from_hf
from esft_jax.interop.hf import expected_shapes, load_hf_model, save_hf_model
from esft_jax.interop.safetensors_io import CheckpointReader, write_safetensors
from esft_jax.paths import set_path
from tests.hf_models import ARCHITECTURES


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A 3-layer DeepSeek-V2 (layers 1 and 2 MoE, 8 experts) as esft-jax writes it, and its tensors."""
  hf = ARCHITECTURES["deepseek_v2"]().to_dict()
  cfg = config_from_hf(hf)
  rng = np.random.default_rng(0)  # the values do not matter here: drawn in numpy, without compiling an init
  params = {}
  for path, shape in expected_shapes(cfg).items():
    set_path(params, "/".join(path), rng.standard_normal(shape, np.float32))
  directory = save_hf_model(tmp_path_factory.mktemp("model"), cfg, params, hf)
  reader = CheckpointReader(directory)
  return directory, {name: reader.get(name) for name in reader.keys()}


def _variant(tmp_path, checkpoint, config_changes=None, tensors=None):
  """The checkpoint with other config.json values and extra or replaced tensors."""
  directory, base = checkpoint
  config = {**json.loads((directory / "config.json").read_text()), **(config_changes or {})}
  (tmp_path / "config.json").write_text(json.dumps(config))
  write_safetensors(tmp_path / "model.safetensors", {**base, **(tensors or {})})
  return tmp_path


def test_a_config_with_fewer_layers_than_the_checkpoint_is_refused(tmp_path, checkpoint):
  model = _variant(tmp_path, checkpoint, {"num_hidden_layers": 2})
  n_layer_2 = sum(name.startswith("model.layers.2.") for name in checkpoint[1])
  with pytest.raises(ValueError, match=rf"{n_layer_2} tensors of the checkpoint are not used by its config.json: "
                                       r"model\.layers\.2\..* and \d+ more\. the checkpoint holds layers up to 2 "
                                       r"but config.json declares num_hidden_layers=2"):
    load_hf_model(model)


def test_a_config_with_fewer_experts_than_the_checkpoint_is_refused(tmp_path, checkpoint):
  model = _variant(tmp_path, checkpoint, {"n_routed_experts": 6, "num_experts_per_tok": 2})
  with pytest.raises(ValueError, match=r"12 tensors .* not used .*: model\.layers\.1\.mlp\.experts\.6\.down_proj"):
    load_hf_model(model)  # experts 6 and 7 of layers 1 and 2, three projections each


def test_rotary_buffers_and_multi_token_prediction_layers_are_left_unused_without_error(tmp_path, checkpoint):
  extra = {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32),
           "model.layers.3.embed_tokens.weight": np.zeros((8, 4), np.float32),
           "model.layers.3.eh_proj.weight": np.zeros((4, 8), np.float32)}
  without, with_mtp = tmp_path / "without", tmp_path / "with"
  without.mkdir()
  with_mtp.mkdir()
  with pytest.raises(ValueError, match=r"^\S+: 2 tensors .*: model.layers.3.eh_proj.weight, "
                                       r"model.layers.3.embed_tokens.weight\. "):
    load_hf_model(_variant(without, checkpoint, tensors=extra))  # the rotary buffer alone is allowed
  loaded = load_hf_model(_variant(with_mtp, checkpoint, {"num_nextn_predict_layers": 1}, extra))
  assert loaded.config.num_layers == 3


def test_check_finite_names_the_non_finite_tensors(tmp_path, checkpoint):
  name = "model.layers.1.mlp.experts.5.up_proj.weight"
  broken = checkpoint[1][name].copy()
  broken[0, 0] = np.inf
  norm = np.full_like(checkpoint[1]["model.norm.weight"], np.nan)
  model = _variant(tmp_path, checkpoint, tensors={name: broken, "model.norm.weight": norm})
  with pytest.raises(ValueError, match=rf"2 tensors hold NaN or infinite values: {name}, model.norm.weight; "):
    load_hf_model(model, check_finite=True)
  assert not np.isfinite(np.asarray(load_hf_model(model).params["norm"]["scale"])).any()  # unchecked: loads
