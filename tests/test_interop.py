"""HF directories in and out: bit-exact round trips, transformers loads what we write, sharded and fused
layouts, and clear errors for bad checkpoints."""

import json
import shutil
import struct

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import peft
import torch
import transformers

from esft_jax.config import config_from_hf
from esft_jax.cli import main
from esft_jax.esft.trainable import TrainPlan, init_trainable
from esft_jax.esft.trained_experts import TrainedExperts
from esft_jax.interop.adapter import checkpoint_dtypes, load_adapter, save_adapter
from esft_jax.interop.hf import load_hf_model, save_hf_model
from esft_jax.interop.safetensors_io import CheckpointReader, SafetensorsFile, write_safetensors
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
  chex.assert_trees_all_equal(loaded.params, reloaded.params)


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
  chex.assert_trees_all_equal(a.params, b.params)


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


# --- LoRA adapters in PEFT's layout ---------------------------------------------------------------------------


def _peft_adapter(directory, name="deepseek_v2", **lora_settings):
  """A PEFT LoRA adapter with random (non-zero) factors on a tiny model, and PEFT's own logits on TOKENS."""
  model = build_hf_model(name)
  settings = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, **lora_settings}
  tuned = peft.get_peft_model(model, peft.LoraConfig(**settings)).eval()
  tuned.save_pretrained(directory)
  with torch.no_grad():
    return tuned(torch.tensor(TOKENS)).logits.numpy()


TOKENS = np.random.default_rng(0).integers(3, 90, size=(2, 9))
FUSED_EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _logits(base_dir, adapter_dir):
  base = load_hf_model(base_dir)
  merged = load_adapter(adapter_dir, base.config, base.params)
  return np.asarray(Transformer(base.config).apply({"params": merged}, jnp.asarray(TOKENS)).logits)


@pytest.mark.parametrize("name, targets", [
    ("deepseek_v2", {"target_modules": ["q_proj", "kv_b_proj", "o_proj"], "target_parameters": FUSED_EXPERTS}),
    ("deepseek_v2", {"target_modules": ["o_proj"], "target_parameters": ["mlp.experts.down_proj"],
                     "use_rslora": True}),
    ("deepseek_v2", {"target_modules": None, "target_parameters": ["mlp.experts.gate_up_proj"]}),
    # transformers 4's names: PEFT fuses gate and up into gate_up_proj with rank 2r, alpha 2 alpha
    ("deepseek_v2", {"target_modules": ["q_proj", "gate_proj", "up_proj", "down_proj"], "lora_alpha": 6}),
    ("mixtral", {"target_modules": ["q_proj", "v_proj"], "target_parameters": FUSED_EXPERTS}),
])
def test_peft_fused_expert_lora_gives_peft_logits(tmp_path, name, targets):
  base_model = save_hf_model_dir(name, tmp_path / "base")
  expected = _peft_adapter(tmp_path / "adapter", name, **targets)
  with torch.no_grad():
    assert np.abs(base_model(torch.tensor(TOKENS)).logits.numpy() - expected).max() > 0.1  # the adapter matters
  np.testing.assert_allclose(_logits(tmp_path / "base", tmp_path / "adapter"), expected, atol=1e-4)


def _random_factors(plan, params):
  """LoRA factors of the plan's shapes, all non-zero (numpy: drawing each with jax would compile every shape)."""
  rng = np.random.default_rng(3)
  shapes = jax.eval_shape(lambda: init_trainable(plan, params))
  return jax.tree_util.tree_map(lambda s: 0.05 * rng.standard_normal(s.shape).astype(np.float32), shapes)


def test_our_lora_adapter_lists_its_modules_and_peft_loads_it(tmp_path):
  base_model = save_hf_model_dir("deepseek_v2", tmp_path / "base")
  base = load_hf_model(tmp_path / "base")
  plan = TrainPlan("lora", lora_rank=2)
  save_adapter(tmp_path / "adapter", base.config, base.params, plan, _random_factors(plan, base.params))
  settings = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  written = {k.removesuffix(".lora_A.weight").rsplit(".", 1)[-1]
             for k in SafetensorsFile(tmp_path / "adapter" / "adapter_model.safetensors").keys()
             if k.endswith(".lora_A.weight")}
  assert settings["target_modules"] == sorted(written)
  assert not {"gate", "lm_head", "embed_tokens"} & set(settings["target_modules"])

  tuned = peft.PeftModel.from_pretrained(base_model, tmp_path / "adapter").eval()
  with torch.no_grad():
    expected = tuned(torch.tensor(TOKENS)).logits.numpy()
  np.testing.assert_allclose(_logits(tmp_path / "base", tmp_path / "adapter"), expected, atol=1e-4)


def _write_lora(directory, tensors, **settings):
  directory.mkdir()
  (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                             **settings}))
  write_safetensors(directory / "adapter_model.safetensors", tensors)


@pytest.mark.parametrize("tensors, settings, message", [
    ({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((2, 64), np.float32),
      "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((80, 2), np.float32),
      "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": np.ones(80, np.float32)},
     {}, r"1 tensors are not LoRA factors \('base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude"),
    ({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((2, 64), np.float32)},
     {}, "has lora_A but no lora_B"),
    ({"base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight": np.ones((2, 64), np.float32),
      "base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight": np.ones((80, 2), np.float32)},
     {}, r"factors of 1 modules map to no weight of this deepseek_v2 model: 'model.layers.7.self_attn.q_proj'"),
    ({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((2, 63), np.float32),
      "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((80, 2), np.float32)},
     {}, r"lora_A \(2, 63\) and lora_B \(80, 2\), which do not fit its weight \[out 80, in 64\]"),
    ({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((2, 64), np.float32),
      "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((80, 2), np.float32)},
     {"use_dora": True}, "use_dora=True is not supported"),
    ({"base_model.model.model.layers.1.mlp.experts.lora_A.weight": np.ones((16, 64), np.float32),
      "base_model.model.model.layers.1.mlp.experts.lora_B.weight": np.ones((40, 16), np.float32)},
     {}, r"fit neither gate_up_proj \[8, 48, 64\] nor down_proj \[8, 64, 24\]"),
])
def test_lora_tensors_that_map_to_nothing_are_refused(tmp_path, tensors, settings, message):
  save_hf_model_dir("deepseek_v2", tmp_path / "base")
  _write_lora(tmp_path / "adapter", tensors, **settings)
  base = load_hf_model(tmp_path / "base")
  with pytest.raises((KeyError, ValueError), match=message):
    load_adapter(tmp_path / "adapter", base.config, base.params)


def test_export_onto_a_base_without_the_adapted_module_fails_naming_it(tmp_path, capsys):
  save_hf_model_dir("deepseek_v2", tmp_path / "base")
  base = load_hf_model(tmp_path / "base")
  plan = TrainPlan("lora", lora_rank=2)
  save_adapter(tmp_path / "adapter", base.config, base.params, plan, _random_factors(plan, base.params))
  other = ARCHITECTURES["deepseek_v2"]()
  other.q_lora_rank = 16  # q_a_proj and q_b_proj instead of q_proj
  transformers.AutoModelForCausalLM.from_config(other).save_pretrained(tmp_path / "q_lora_base")
  with pytest.raises(SystemExit):
    main(["export", "--model", str(tmp_path / "q_lora_base"), "--adapter", str(tmp_path / "adapter"),
          "--out", str(tmp_path / "merged")])
  captured = capsys.readouterr()
  assert "LoRA factors of 3 modules map to no weight" in captured.err and "self_attn.q_proj" in captured.err
  assert "wrote" not in captured.out and not (tmp_path / "merged").exists()


# --- ESFT adapters --------------------------------------------------------------------------------------------


def test_esft_adapter_is_stored_in_the_base_checkpoints_dtype(tmp_path):
  save_hf_model_dir("deepseek_v2", tmp_path / "base")  # an fp32 checkpoint
  base = load_hf_model(tmp_path / "base", dtype=jnp.bfloat16)  # trained with bf16 frozen weights
  dtypes = checkpoint_dtypes(tmp_path / "base", base.config)
  assert set(dtypes.values()) == {np.dtype(np.float32)}
  plan = TrainPlan("esft", experts=TrainedExperts(((1, (5, 2)), (2, (0,)))), shared_experts=True)
  rng = np.random.default_rng(0)
  trainable = jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                                     jax.eval_shape(lambda: init_trainable(plan, base.params)))
  save_adapter(tmp_path / "adapter", base.config, base.params, plan, trainable, dtypes=dtypes)
  reader = SafetensorsFile(tmp_path / "adapter" / "model.safetensors")
  experts = trainable["layers_1"]["mlp"]["experts"]["up_proj"]
  for row, expert in enumerate((5, 2)):  # the trained rows, bit for bit, as the experts they were selected as
    np.testing.assert_array_equal(reader.get(f"model.layers.1.mlp.experts.{expert}.up_proj.weight"), experts[row].T)
  shared = trainable["layers_2"]["mlp"]["shared_experts"]["down_proj"]["kernel"]
  np.testing.assert_array_equal(reader.get("model.layers.2.mlp.shared_experts.down_proj.weight"), shared.T)
  assert {reader.dtype(k) for k in reader.keys()} == {np.dtype(np.float32)}
  assert len(reader.keys()) == 3 * 3 + 3 * 2  # 3 experts and 2 layers' shared experts, 3 projections each

  save_adapter(tmp_path / "as_params", base.config, base.params, plan, trainable)  # no dtypes: the params' own
  assert SafetensorsFile(tmp_path / "as_params" / "model.safetensors").dtype(
      "model.layers.1.mlp.experts.5.up_proj.weight") == jnp.bfloat16
