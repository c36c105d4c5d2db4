"""FP8 block-scaled checkpoints (DeepSeek-V3's release format) read directly: a tiny DeepSeek-V3 quantized here
in numpy, with dimensions that leave partial blocks, loads equal to numpy's dequantization bit for bit."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from esft_jax.config import config_from_hf
from esft_jax.interop import fp8
from esft_jax.interop.hf import hf_tensors, load_hf_model
from esft_jax.interop.safetensors_io import CheckpointReader, write_safetensors
from esft_jax.model.transformer import init_params

# Every matrix dimension below leaves a partial block at [16, 12] and at DeepSeek's [128, 128].
TINY_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 96, "hidden_size": 40,
    "intermediate_size": 56, "moe_intermediate_size": 20, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 2, "n_shared_experts": 1, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "first_k_dense_replace": 1, "moe_layer_freq": 1, "n_group": 2, "topk_group": 1, "topk_method": "noaux_tc",
    "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5, "kv_lora_rank": 18,
    "q_lora_rank": 26, "qk_nope_head_dim": 12, "qk_rope_head_dim": 8, "v_head_dim": 10, "hidden_act": "silu",
    "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000, "attention_bias": False,
    "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
}
E4M3_MAX = 448.0


def _quantized(name: str) -> bool:
  """The tensors DeepSeek-V3's release stores in FP8: every projection; not the router, embeddings, norms, head."""
  return name.endswith("proj.weight") or name.endswith("proj_with_mqa.weight")


def _quantize(weight: np.ndarray, block: tuple[int, int], rng) -> tuple[np.ndarray, np.ndarray]:
  """FP8 values and per-block float32 scales (amax / 448), blocks of deliberately different magnitudes."""
  rows, cols = (-(-d // b) for d, b in zip(weight.shape, block))
  spread = np.exp(rng.normal(0, 1.5, (rows, cols))).astype(np.float32)
  weight = weight * np.repeat(np.repeat(spread, block[0], 0), block[1], 1)[:weight.shape[0], :weight.shape[1]]
  scale = np.zeros((rows, cols), np.float32)
  q = np.zeros(weight.shape, ml_dtypes.float8_e4m3fn)
  for i in range(rows):
    for j in range(cols):
      tile = weight[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]]
      scale[i, j] = np.abs(tile).max() / E4M3_MAX
      q[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] = (tile / scale[i, j]).astype(q.dtype)
  return q, scale


def _dequantized(q: np.ndarray, scale: np.ndarray, block: tuple[int, int], dtype) -> np.ndarray:
  """numpy's reading of DeepSeek's weight_dequant: fp32 product per block, rounded once to `dtype`."""
  expanded = np.repeat(np.repeat(scale, block[0], 0), block[1], 1)[:q.shape[0], :q.shape[1]]
  return (q.astype(np.float32) * expanded).astype(dtype)


def _write_fp8_checkpoint(directory, block=(16, 12), config_block=None) -> dict[str, tuple]:
  """A tiny FP8 DeepSeek-V3 directory; returns {name: (fp8, scale)} of its quantized tensors and the rest."""
  directory.mkdir(parents=True, exist_ok=True)
  hf = dict(TINY_V3, quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                          "weight_block_size": list(config_block or block)})
  (directory / "config.json").write_text(json.dumps(hf))
  cfg = config_from_hf(hf)
  rng = np.random.default_rng(0)
  tensors, stored = {}, {}
  for name, array in hf_tensors(cfg, init_params(cfg, jax.random.key(0))):
    if _quantized(name):
      q, scale = _quantize(np.asarray(array, np.float32), block, rng)
      tensors[name], tensors[fp8.scale_name(name)] = q, scale
      stored[name] = (q, scale)
    else:  # as the release stores them: bf16, the correction bias fp32
      tensors[name] = array if name.endswith("e_score_correction_bias") else array.astype(ml_dtypes.bfloat16)
      stored[name] = (tensors[name], None)
  write_safetensors(directory / "model.safetensors", tensors)
  return stored


@pytest.mark.parametrize("block", [(16, 12), (128, 128)])
@pytest.mark.parametrize("dtype", [None, jnp.float32])
def test_fp8_checkpoint_equals_numpy_dequantization(tmp_path, block, dtype):
  stored = _write_fp8_checkpoint(tmp_path, block)
  loaded = load_hf_model(tmp_path, dtype=dtype, check_finite=True)  # the scales count as read, not as unused
  assert "quantization_config" not in loaded.hf_config  # what it would write back is no longer FP8
  expected_dtype = np.dtype(ml_dtypes.bfloat16) if dtype is None else np.dtype(np.float32)
  got = dict(hf_tensors(loaded.config, loaded.params))
  assert set(got) == set(stored)
  for name, (values, scale) in stored.items():
    if scale is None:
      np.testing.assert_array_equal(got[name].astype(np.float32), values.astype(np.float32), err_msg=name)
      continue
    want = _dequantized(values, scale, block, expected_dtype)
    assert got[name].dtype == expected_dtype, name
    assert got[name].tobytes() == want.tobytes(), name


def test_fp8_slices_dequantize_alone(tmp_path):
  """What each device of a sharded load receives: any slice of the lazy view equals that slice of the whole."""
  stored = _write_fp8_checkpoint(tmp_path)
  reader = CheckpointReader(tmp_path)
  names = tuple(f"model.layers.1.mlp.experts.{e}.down_proj.weight" for e in range(4))
  view = fp8.dequantized_entry(reader, names, "experts", (4, 20, 40), (16, 12))
  whole = np.asarray(view)
  for e, name in enumerate(names):  # Flax layout: [E, in, out], each expert transposed
    q, scale = stored[name]
    np.testing.assert_array_equal(whole[e], _dequantized(q, scale, (16, 12), ml_dtypes.bfloat16).T)
  for index in [(slice(1, 3), slice(None), slice(None)), (slice(None), slice(5, 17), slice(0, 13)),
                (slice(3, 4), slice(10, 20), slice(20, 40))]:
    assert view[index].tobytes() == np.ascontiguousarray(whole[index]).tobytes(), index
  # A sharded load fills each shard from the view (one device here: the same callback path, whole slices).
  mesh = jax.make_mesh((1,), ("x",), devices=jax.devices()[:1])
  shardings = jax.tree_util.tree_map(lambda _: NamedSharding(mesh, P()), load_hf_model(tmp_path).params)
  sharded = load_hf_model(tmp_path, shardings=shardings)
  np.testing.assert_array_equal(np.asarray(sharded.params["layers_1"]["mlp"]["experts"]["down_proj"]), whole)


def _edit_checkpoint(directory, edit):
  reader = CheckpointReader(directory)
  tensors = {k: np.asarray(reader.get(k)) for k in reader.keys()}
  edit(tensors)
  write_safetensors(directory / "model.safetensors", tensors)


def _edit_config(directory, edit):
  hf = json.loads((directory / "config.json").read_text())
  edit(hf)
  (directory / "config.json").write_text(json.dumps(hf))


SCALE = "model.layers.1.self_attn.o_proj.weight_scale_inv"


@pytest.mark.parametrize("break_it, message", [
    (lambda d: _edit_checkpoint(d, lambda t: t.update({SCALE: np.ones((2, 2), np.float32)})),
     r"o_proj.weight_scale_inv has shape \(2, 2\), expected \(3, 2\)"),
    (lambda d: _edit_checkpoint(d, lambda t: t.pop(SCALE)), "o_proj.weight is FP8 without a block scale"),
    (lambda d: _edit_checkpoint(d, lambda t: t.pop("model.layers.1.mlp.experts.2.up_proj.weight_scale_inv")),
     "experts.2.up_proj.weight has no block scale"),
    (lambda d: _edit_config(d, lambda c: c.pop("quantization_config")), "is an FP8 block scale but .* has no "
     "quantization_config"),
    (lambda d: _edit_config(d, lambda c: c["quantization_config"].update(quant_method="awq")),
     "quant_method 'awq' is not supported"),
    (lambda d: _edit_config(d, lambda c: c["quantization_config"].update(weight_block_size=[128])),
     r"weight_block_size \[128\] must be two positive integers"),
])
def test_bad_fp8_checkpoints_are_named(tmp_path, break_it, message):
  _write_fp8_checkpoint(tmp_path)
  break_it(tmp_path)
  with pytest.raises(ValueError, match=message):
    load_hf_model(tmp_path)
