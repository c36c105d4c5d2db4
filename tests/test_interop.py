"""HF directories in and out: bit-exact round trips, transformers loads what we write, sharded and fused
layouts, and clear errors for bad checkpoints."""

import json
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from esft_jax.config import config_from_hf
from esft_jax.interop.hf import load_hf_model, save_hf_model
from esft_jax.interop.safetensors_io import CheckpointReader, write_safetensors
from esft_jax.model.transformer import Transformer, init_params
from tests.hf_models import ARCHITECTURES, build_hf_model, save_hf_model_dir


def _all_tensors(directory):
  reader = CheckpointReader(directory)
  return {k: np.asarray(reader.get(k)) for k in reader.keys()}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_round_trip_is_bit_exact(tmp_path, name):
  save_hf_model_dir(name, tmp_path / "hf")
  loaded = load_hf_model(tmp_path / "hf")
  save_hf_model(tmp_path / "out", loaded.config, loaded.params, loaded.hf_config)
  original, written = _all_tensors(tmp_path / "hf"), _all_tensors(tmp_path / "out")
  assert set(original) == set(written)
  for key, value in original.items():
    assert value.dtype == written[key].dtype and value.tobytes() == written[key].tobytes(), key


def test_bf16_round_trip_and_sharding(tmp_path):
  model = build_hf_model("deepseek_v3").to(torch.bfloat16)
  model.save_pretrained(tmp_path / "hf")
  cast = load_hf_model(tmp_path / "hf", dtype=jnp.bfloat16)
  assert cast.params["layers_1"]["mlp"]["experts"]["gate_proj"].dtype == jnp.bfloat16
  assert cast.params["layers_1"]["mlp"]["gate"]["kernel"].dtype == jnp.float32  # a cast keeps the router fp32
  loaded = load_hf_model(tmp_path / "hf")  # no cast: the checkpoint's own dtypes, for exact round trips
  save_hf_model(tmp_path / "out", loaded.config, loaded.params, loaded.hf_config, max_shard_bytes=20_000)
  assert (tmp_path / "out" / "model.safetensors.index.json").exists()
  assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1
  original, written = _all_tensors(tmp_path / "hf"), _all_tensors(tmp_path / "out")
  for key, value in original.items():
    assert value.tobytes() == written[key].tobytes(), key
  reloaded = load_hf_model(tmp_path / "out")
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                         loaded.params, reloaded.params)


@pytest.mark.parametrize("name", ["deepseek_v2", "qwen2_moe", "mixtral"])
def test_transformers_loads_what_we_write(tmp_path, name):
  hf_config = ARCHITECTURES[name]().to_dict()
  cfg = config_from_hf(hf_config)
  params = init_params(cfg, jax.random.key(1))
  save_hf_model(tmp_path, cfg, params, hf_config)
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
  tokens = np.random.default_rng(0).integers(3, 90, size=(2, 9))
  with torch.no_grad():
    expected = model(torch.tensor(tokens)).logits.numpy()
  got = Transformer(cfg).apply({"params": params}, jnp.asarray(tokens)).logits
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4)


def test_fused_expert_layout_loads_like_per_expert(tmp_path):
  model = save_hf_model_dir("qwen3_moe", tmp_path / "per_expert")
  fused_dir = tmp_path / "fused"
  fused_dir.mkdir()
  shutil.copy(tmp_path / "per_expert" / "config.json", fused_dir)
  # transformers' in-memory state dict holds experts fused: gate_up_proj [E, 2F, D], down_proj [E, D, F].
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  assert any(k.endswith("experts.gate_up_proj") for k in state)
  write_safetensors(fused_dir / "model.safetensors", state)
  a, b = load_hf_model(tmp_path / "per_expert"), load_hf_model(fused_dir)
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a.params, b.params)


def _saved(tmp_path, name="deepseek_v2"):
  save_hf_model_dir(name, tmp_path)
  return tmp_path


def test_missing_checkpoint_file(tmp_path):
  d = _saved(tmp_path)
  (d / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="no model.safetensors"):
    load_hf_model(d)


def test_truncated_checkpoint(tmp_path):
  d = _saved(tmp_path)
  data = (d / "model.safetensors").read_bytes()
  (d / "model.safetensors").write_bytes(data[: len(data) - 100])
  with pytest.raises(ValueError, match="model.safetensors: truncated: tensor"):
    load_hf_model(d)


def test_unknown_model_type(tmp_path):
  d = _saved(tmp_path)
  config = json.loads((d / "config.json").read_text())
  config["model_type"] = "llama"
  (d / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="config.json: model_type 'llama' is not supported"):
    load_hf_model(d)


def _rewrite(directory, edit):
  tensors = _all_tensors(directory)
  edit(tensors)
  write_safetensors(directory / "model.safetensors", tensors)


def test_wrong_shape_names_file_and_tensor(tmp_path):
  d = _saved(tmp_path)
  _rewrite(d, lambda t: t.update({"model.norm.weight": np.ones(7, np.float32)}))
  with pytest.raises(ValueError, match=r"tensor 'model.norm.weight' has shape \(7,\), expected \(64,\)"):
    load_hf_model(d)


def test_missing_expert_is_named(tmp_path):
  d = _saved(tmp_path)
  _rewrite(d, lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
  with pytest.raises(KeyError, match="model.layers.2.mlp.experts.5.up_proj.weight"):
    load_hf_model(d)


def test_corrupt_header(tmp_path):
  d = _saved(tmp_path)
  (d / "model.safetensors").write_bytes(struct.pack("<Q", 5) + b"{nope")
  with pytest.raises(ValueError, match="corrupt safetensors header"):
    load_hf_model(d)
