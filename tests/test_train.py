"""The training machinery: what each method trains, frozen parameters untouched, slice gradients, optimizer
memory, resume, and adapters that transformers and esft-jax both read."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from esft_jax.config import config_from_hf, load_config
from esft_jax.esft.trainable import (TrainPlan, count_parameters, init_trainable, merge_trainable,
                                     plan_from_expert_config, tree_bytes)
from esft_jax.interop.adapter import load_adapter, save_adapter
from esft_jax.interop.hf import load_hf_model
from esft_jax.interop.safetensors_io import CheckpointReader, write_safetensors
from esft_jax.model.transformer import Transformer, init_params, parameter_counts
from esft_jax.paths import leaves_by_path
from esft_jax.train.optimizer import make_optimizer
from esft_jax.train.loss import token_cross_entropy
from esft_jax.sharding import place, single_device_mesh
from esft_jax.train.trainer import TrainConfig, TrainState, loss_fn, make_train_step, step_shardings, train
from tests.hf_models import ARCHITECTURES, save_hf_model_dir
from tests.jaxprs import scatters
from tests.replay import replay

EXPERTS = {"1": [3, 0], "2": [5]}


def _setup():
  hf = ARCHITECTURES["deepseek_v2"]().to_dict()
  cfg = config_from_hf(hf)
  return cfg, init_params(cfg, jax.random.key(0)), hf


def _batches(cfg, n, seed=0, b=2, length=12):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    tokens = rng.integers(3, cfg.vocab_size, size=(b, length + 1))
    mask = (rng.random((b, length)) < 0.7).astype(np.float32)
    out.append({"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
                "loss_mask": mask, "segment_ids": np.ones((b, length), np.int32),
                "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy()})
  return out


def _esft_plan(shared=False, non_expert=False):
  return plan_from_expert_config({"experts": EXPERTS, "shared_experts": shared, "non_expert_modules": non_expert})


def test_trainable_counts_for_each_method_and_flag():
  cfg, params, _ = _setup()
  counts = parameter_counts(cfg)
  per_expert = counts.per_expert
  shared = sum(v.size for p, v in leaves_by_path(params).items() if "/shared_experts/" in p)
  routed = sum(v.size for p, v in leaves_by_path(params).items() if "/mlp/experts/" in p)
  assert count_parameters(init_trainable(_esft_plan(), params)) == 3 * per_expert
  assert count_parameters(init_trainable(_esft_plan(shared=True), params)) == 3 * per_expert + shared
  assert count_parameters(init_trainable(_esft_plan(non_expert=True), params)) == \
      counts.total - routed - shared + 3 * per_expert
  assert count_parameters(init_trainable(_esft_plan(True, True), params)) == counts.total - routed + 3 * per_expert
  assert count_parameters(init_trainable(TrainPlan("fft"), params)) == counts.total
  lora = init_trainable(TrainPlan("lora", lora_rank=4), params)
  expected = 0
  for path, leaf in leaves_by_path(params).items():
    if path.startswith(("embed_tokens", "lm_head")) or "/mlp/gate/" in path:
      continue
    if path.endswith("/kernel") or "/mlp/experts/" in path:
      *lead, fan_in, fan_out = leaf.shape
      expected += int(np.prod(lead, dtype=int)) * 4 * (fan_in + fan_out)
  assert count_parameters(lora) == expected


@pytest.mark.parametrize("method", ["esft", "fft", "lora"])
def test_merge_of_fresh_trainable_is_identity(method):
  cfg, params, _ = _setup()
  plan = _esft_plan(shared=True) if method == "esft" else TrainPlan(method)
  merged = merge_trainable(plan, params, init_trainable(plan, params))
  chex.assert_trees_all_equal(params, merged)


def test_slice_gradient_equals_rows_of_full_gradient_and_idle_experts_get_zero():
  cfg, params, _ = _setup()
  model = Transformer(cfg)
  batch = jax.tree_util.tree_map(jnp.asarray, _batches(cfg, 1, b=1, length=2)[0])
  used = np.unique(np.asarray(model.apply({"params": params}, batch["inputs"]).routing[1].expert_ids))
  idle = int(np.setdiff1d(np.arange(cfg.num_experts), used)[0])  # layer 2 sends no token to this expert
  plan = plan_from_expert_config({"experts": {"1": [3, 0], "2": [int(used[0]), idle]}})
  fft = TrainPlan("fft")
  slice_grads, _ = jax.grad(loss_fn(model, plan), has_aux=True)(init_trainable(plan, params), params, batch)
  full_grads, _ = jax.grad(loss_fn(model, fft), has_aux=True)(init_trainable(fft, params), params, batch)
  for layer, ids in plan.experts.layers:
    for proj in ("gate_proj", "up_proj", "down_proj"):
      got = slice_grads[f"layers_{layer}"]["mlp"]["experts"][proj]
      want = full_grads[f"layers_{layer}"]["mlp"]["experts"][proj][jnp.asarray(ids)]
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  for proj in ("gate_proj", "up_proj", "down_proj"):
    assert float(jnp.abs(slice_grads["layers_2"]["mlp"]["experts"][proj][1]).max()) == 0.0
    assert float(jnp.abs(slice_grads["layers_2"]["mlp"]["experts"][proj][0]).max()) > 0.0


def test_esft_backward_writes_no_full_size_tensor_by_scatter():
  """The ESFT step's only scatters of a full-size tensor are the merge's writes of the trained rows into their
  frozen stacks: none into the [B, L, V] logits (cross-entropy's target logit) and no full-size id tensor (which a
  scatter that may repeat an index needs to differentiate)."""
  cfg, params, _ = _setup()
  batch = jax.tree_util.tree_map(jnp.asarray, _batches(cfg, 1)[0])
  plan = _esft_plan()
  trainable = init_trainable(plan, params)
  found = scatters(jax.make_jaxpr(jax.grad(lambda t: loss_fn(Transformer(cfg), plan)(t, params, batch)[0]))(
      trainable))
  stacks = {leaf.shape for path, leaf in leaves_by_path(params).items() if "/mlp/experts/" in path}
  large = [(name, operand.dtype) for name, operand in found
           if operand.shape in stacks or operand.shape == (*batch["inputs"].shape, cfg.vocab_size)]
  assert large == [("scatter", jnp.float32)] * 3 * len(EXPERTS), found


def _moved(trainable, seed=1):
  """`trainable` moved off its initial values, so that rows written and rows merged could differ."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda x: x + jnp.asarray(rng.standard_normal(x.shape) * 0.05, x.dtype), trainable)


def test_loss_on_written_rows_equals_the_merged_loss_and_writes_no_stack():
  cfg, params, _ = _setup()
  batch = jax.tree_util.tree_map(jnp.asarray, _batches(cfg, 1)[0])
  plan = _esft_plan()
  trainable = _moved(init_trainable(plan, params))
  rest, stacks = plan.experts.split(params)
  written_params = plan.experts.join(rest, plan.experts.write_rows(stacks, trainable))
  model = Transformer(cfg, trained_experts=plan.trained_experts)
  merged = jax.value_and_grad(lambda t: loss_fn(Transformer(cfg), plan)(t, params, batch)[0])
  in_place = jax.value_and_grad(lambda t: loss_fn(model, plan, rows_already_written=True)(
      t, written_params, batch)[0])
  (want_loss, want_grads), (got_loss, got_grads) = merged(trainable), in_place(trainable)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  chex.assert_trees_all_close(got_grads, want_grads, rtol=1e-5, atol=1e-8)
  found = scatters(jax.make_jaxpr(jax.grad(lambda t: loss_fn(model, plan, rows_already_written=True)(
      t, written_params, batch)[0]))(trainable))
  full_size = {leaf.shape for path, leaf in leaves_by_path(params).items() if "/mlp/experts/" in path}
  full_size.add((*batch["inputs"].shape, cfg.vocab_size))
  assert found and not [operand for _, operand in found if operand.shape in full_size], found  # small counts only


def test_loss_on_written_rows_needs_the_plans_trained_experts_in_the_model():
  cfg, _, _ = _setup()
  with pytest.raises(ValueError, match=r"build the model with Transformer\(trained_experts=plan.trained_experts\)"):
    loss_fn(Transformer(cfg), _esft_plan(), rows_already_written=True)


def test_train_step_of_one_micro_batch_equals_two_equal_ones_and_keeps_frozen_values():
  """The step without an accumulator (one micro-batch) against the scan that averages two copies of it; the stacks
  it is handed come back with only the trained rows changed."""
  cfg, params, _ = _setup()
  plan = _esft_plan()
  optimizer = make_optimizer(jax.eval_shape(lambda p: init_trainable(plan, p), params), lambda step: 1e-3)
  model = Transformer(cfg, trained_experts=plan.trained_experts)

  def init(frozen, stacks):
    trainable = init_trainable(plan, plan.experts.join(frozen, stacks))
    return TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable), stacks)

  rest, stacks = plan.experts.split(params)
  shardings = step_shardings(cfg, plan, single_device_mesh(), jax.eval_shape(init, rest, stacks))
  step = make_train_step(model, plan, optimizer, lambda s: 1e-3, shardings)
  micro = _batches(cfg, 1)[0]
  compiled = step.lower(init(rest, stacks), rest, {k: v[None] for k, v in micro.items()}).compile()
  # The state, its stacks included, is updated in place: XLA aliases it to its output.
  assert compiled.memory_analysis().alias_size_in_bytes >= tree_bytes(init(rest, stacks))
  results = []
  for copies in (1, 2):
    rest, stacks = plan.experts.split(params)
    stacks = jax.tree_util.tree_map(jnp.copy, stacks)  # donated by the step
    batch = {k: np.stack([v] * copies) for k, v in micro.items()}
    state, metrics = step(init(rest, stacks), rest, batch)
    state, metrics = step(state, rest, batch)
    results.append((state.trainable, metrics["loss"]))
    for path, stack in leaves_by_path(state.stacks).items():
      ids = EXPERTS[path.split("/")[0].removeprefix("layers_")]
      frozen_rows = np.setdiff1d(np.arange(cfg.num_experts), ids)
      before = np.asarray(leaves_by_path(params)[path])
      np.testing.assert_array_equal(np.asarray(stack)[frozen_rows], before[frozen_rows])
      assert not np.array_equal(np.asarray(stack)[ids], before[ids])
  (one, loss_one), (two, loss_two) = results
  np.testing.assert_allclose(loss_one, loss_two, rtol=1e-6)
  chex.assert_trees_all_close(one, two, rtol=1e-5, atol=1e-7)


def test_train_step_is_traced_once_over_several_steps():
  """Each step's state (its stacks included) goes back in as the next step's argument: its shapes, dtypes and
  shardings must equal what the step takes, or every step would trace and compile again. A batch of another
  length is a new program, and the guard says so."""
  cfg, params, _ = _setup()
  plan = _esft_plan()
  optimizer = make_optimizer(jax.eval_shape(lambda p: init_trainable(plan, p), params), lambda step: 1e-3)

  def init(frozen, stacks):
    trainable = init_trainable(plan, plan.experts.join(frozen, stacks))
    return TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable), stacks)

  rest, stacks = plan.experts.split(params)
  shardings = step_shardings(cfg, plan, single_device_mesh(), jax.eval_shape(init, rest, stacks))
  chex.clear_trace_counter()
  step = make_train_step(Transformer(cfg, trained_experts=plan.trained_experts), plan, optimizer, lambda s: 1e-3,
                         shardings, max_traces=1)
  rest = place(rest, shardings.frozen)  # as `train` lays them out
  stacks = jax.tree_util.tree_map(jnp.copy, place(stacks, shardings.state.stacks))  # donated
  state = jax.jit(init, out_shardings=shardings.state, donate_argnums=(1,))(rest, stacks)
  for batch in _batches(cfg, 3):
    state, metrics = step(state, rest, {k: v[None] for k, v in batch.items()})
  assert int(state.step) == 3 and np.isfinite(float(metrics["loss"]))
  shorter = {k: v[None] for k, v in _batches(cfg, 1, length=8)[0].items()}
  with pytest.raises(AssertionError, match="traced > 1 times"):
    step(state, rest, shorter)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_token_cross_entropy_equals_the_gathered_target_logit(dtype, tol):
  """Values and gradients of the hand-written backward against autodiff of the plain fp32 formula; the gradient
  comes back in the logits' dtype, and the program scatters nothing."""
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.standard_normal((2, 5, 11)) * 3, dtype)
  targets = jnp.asarray(rng.integers(0, 11, (2, 5)), jnp.int32)
  cotangent = jnp.asarray(rng.standard_normal((2, 5)), jnp.float32)
  gathered = lambda x: (jax.nn.logsumexp(x.astype(jnp.float32), -1)
                        - jnp.take_along_axis(x.astype(jnp.float32), targets[..., None], -1)[..., 0])
  got, got_vjp = jax.vjp(lambda x: token_cross_entropy(x, targets), logits)
  want, want_vjp = jax.vjp(gathered, logits)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  got_grad, want_grad = got_vjp(cotangent)[0], want_vjp(cotangent)[0]
  assert got_grad.dtype == dtype
  np.testing.assert_allclose(np.asarray(got_grad, np.float32), np.asarray(want_grad, np.float32), rtol=tol,
                             atol=tol * float(jnp.abs(want_grad.astype(jnp.float32)).max()))
  loss = lambda x: jnp.sum(token_cross_entropy(x, targets) * cotangent)
  assert scatters(jax.make_jaxpr(jax.grad(loss))(logits)) == []


def test_an_expert_listed_twice_is_an_error():
  with pytest.raises(ValueError, match=r"layer 1: expert ids \[3\] are listed more than once"):
    plan_from_expert_config({"experts": {"1": [3, 0, 3]}})


def test_remat_gives_the_same_loss_and_gradients():
  cfg, params, _ = _setup()
  batch = jax.tree_util.tree_map(jnp.asarray, _batches(cfg, 1)[0])
  plan = _esft_plan(shared=True)
  trainable = init_trainable(plan, params)
  (loss, _), grads = jax.value_and_grad(loss_fn(Transformer(cfg), plan), has_aux=True)(trainable, params, batch)
  (loss_r, _), grads_r = jax.value_and_grad(loss_fn(Transformer(cfg, remat=True), plan), has_aux=True)(
      trainable, params, batch)
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  chex.assert_trees_all_close(grads_r, grads, rtol=1e-5, atol=1e-7)
  forward = lambda model: str(jax.make_jaxpr(lambda p: model.apply({"params": p}, batch["inputs"]).logits)(params))
  assert forward(Transformer(cfg, remat=True)).count("remat2[") == cfg.num_layers
  assert "remat2[" not in forward(Transformer(cfg))


def test_optimizer_state_is_proportional_to_selected_experts():
  cfg = load_config("deepseek-v2-lite")
  abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), param_dtype=jnp.bfloat16))
  five = {"experts": {str(l): [0, 1, 2, 3, 4] for l in cfg.moe_layer_ids}}

  def state_bytes(plan):
    trainable = jax.eval_shape(lambda p: init_trainable(plan, p), abstract)
    opt = make_optimizer(trainable, lambda step: 1e-5)
    return tree_bytes(jax.eval_shape(opt.init, trainable)), count_parameters(trainable)

  esft_bytes, esft_params = state_bytes(plan_from_expert_config(five))
  fft_bytes, fft_params = state_bytes(TrainPlan("fft"))
  assert esft_params == 26 * 5 * parameter_counts(cfg).per_expert
  # Adam's two fp32 moments per trained parameter, nothing for the frozen ones (plus step counters).
  assert abs(esft_bytes - 8 * esft_params) < 64 and abs(fft_bytes - 8 * fft_params) < 64
  ratio = fft_bytes / esft_bytes
  assert 12 <= ratio <= 15, ratio  # 15.7B / 1.12B: about a twelfth to a fourteenth


def _run(cfg, params, plan, out_dir, steps, batches, resume=False, val=None, donate_params=False):
  stream, data_state, restore = replay(batches)

  train_cfg = TrainConfig(steps=steps, lr=1e-2, grad_accum=1, eval_every=2, save_every=2, log_every=1,
                          compute_dtype="float32")
  return train(cfg, params, plan, stream, val or [], out_dir, train_cfg, resume=resume,
               data_state=data_state, restore_data=restore, donate_params=donate_params)


def test_donated_parameters_train_alike_and_give_up_only_the_stacks_with_trained_rows(tmp_path):
  cfg, params, _ = _setup()
  plan = _esft_plan()
  batches, val = _batches(cfg, 3), _batches(cfg, 1, seed=9)
  kept = _run(cfg, params, plan, tmp_path / "kept", 3, batches, val=val)
  given = jax.tree_util.tree_map(jnp.copy, params)
  donated = _run(cfg, given, plan, tmp_path / "donated", 3, batches, val=val, donate_params=True)
  assert donated.best_val_loss == kept.best_val_loss
  chex.assert_trees_all_equal(kept.trainable, donated.trainable)
  rest, stacks = plan.experts.split(given)
  assert all(stack.is_deleted() for stack in jax.tree_util.tree_leaves(stacks))  # trained in place: no copy made
  assert not any(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(rest))


def test_training_stops_at_a_batch_with_more_documents_than_the_fused_attention_takes(tmp_path):
  cfg, params, _ = _setup()
  packed = _batches(cfg, 1)
  packed[0]["segment_ids"][0, 6:] = 2  # row 0: two documents
  train_cfg = TrainConfig(steps=1, grad_accum=1, compute_dtype="float32", attention_impl="fused", max_segments=1)
  with pytest.raises(ValueError, match=r"a training batch of step 1: row 0 packs 2 segments, but the fused attention "
                                       r"was built for at most max_segments=1 per row: set max_segments to 2 or more"):
    train(cfg, params, _esft_plan(), iter(packed), [], tmp_path, train_cfg)
  with pytest.raises(ValueError, match="validation batch 0: row 0 packs 2 segments"):
    train(cfg, params, _esft_plan(), iter(_batches(cfg, 1)), packed, tmp_path, train_cfg)


def test_frozen_parameters_stay_bit_identical_and_selected_experts_move(tmp_path):
  cfg, params, _ = _setup()
  plan = _esft_plan()
  result = _run(cfg, params, plan, tmp_path, 3, _batches(cfg, 4), val=_batches(cfg, 1, seed=9))
  merged = merge_trainable(plan, params, result.trainable)
  for path, before in leaves_by_path(params).items():
    after = leaves_by_path(merged)[path]
    if "/mlp/experts/" in path and path.split("/")[0] in ("layers_1", "layers_2"):
      ids = plan.experts.of_layer(int(path.split("/")[0][7:]))
      others = np.setdiff1d(np.arange(cfg.num_experts), ids)
      np.testing.assert_array_equal(np.asarray(after)[others], np.asarray(before)[others])
      assert not np.array_equal(np.asarray(after)[list(ids)], np.asarray(before)[list(ids)])
    else:
      np.testing.assert_array_equal(np.asarray(after), np.asarray(before), err_msg=path)
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert {"loss", "aux_loss", "grad_norm", "lr", "tokens_per_s", "expert_load_max"} <= set(lines[0])
  assert any("val_loss" in l for l in lines)
  assert list((tmp_path / "tensorboard").iterdir())


def test_esft_adapter_loads_into_transformers_and_changes_only_listed_experts(tmp_path):
  save_hf_model_dir("deepseek_v2", tmp_path / "base")
  base = load_hf_model(tmp_path / "base")
  plan = _esft_plan()
  trainable = jax.tree_util.tree_map(lambda x: x + 0.05, init_trainable(plan, base.params))
  save_adapter(tmp_path / "adapter", base.config, base.params, plan, trainable)
  assert json.loads((tmp_path / "adapter" / "expert_cfg.json").read_text())["experts"] == EXPERTS
  adapter = CheckpointReader(tmp_path / "adapter")
  expected = {f"model.layers.{l}.mlp.experts.{e}.{p}.weight" for l, ids in EXPERTS.items() for e in ids
              for p in ("gate_proj", "up_proj", "down_proj")}
  assert set(adapter.keys()) == expected

  # Apply the adapter the way the official code does: overwrite those tensors of the base checkpoint.
  tensors = {k: np.asarray(CheckpointReader(tmp_path / "base").get(k)) for k in
             CheckpointReader(tmp_path / "base").keys()}
  tensors.update({k: np.asarray(adapter.get(k)) for k in adapter.keys()})
  merged_dir = tmp_path / "merged"
  merged_dir.mkdir()
  (merged_dir / "config.json").write_text((tmp_path / "base" / "config.json").read_text())
  write_safetensors(merged_dir / "model.safetensors", tensors)
  hf_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
  hf_tuned = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, attn_implementation="eager").eval()
  changed = set()
  for (name, a), (_, b) in zip(hf_base.state_dict().items(), hf_tuned.state_dict().items()):
    if "experts" in name:
      for e in range(a.shape[0]):
        if not torch.equal(a[e], b[e]):
          changed.add((name.split(".")[2], e))
    else:
      assert torch.equal(a, b), name
  assert changed == {(l, e) for l, ids in EXPERTS.items() for e in ids}

  ours = load_adapter(tmp_path / "adapter", base.config, base.params)
  tokens = np.random.default_rng(0).integers(3, 90, size=(1, 10))
  with torch.no_grad():
    expected_logits = hf_tuned(torch.tensor(tokens)).logits.numpy()
  got = Transformer(base.config).apply({"params": ours}, jnp.asarray(tokens)).logits
  np.testing.assert_allclose(np.asarray(got), expected_logits, atol=1e-4)


def test_legacy_adapter_keys_without_model_prefix_load(tmp_path):
  cfg, params, _ = _setup()
  plan = _esft_plan()
  trainable = jax.tree_util.tree_map(lambda x: x * 2, init_trainable(plan, params))
  save_adapter(tmp_path / "new", cfg, params, plan, trainable)
  reader = CheckpointReader(tmp_path / "new")
  (tmp_path / "legacy").mkdir()
  write_safetensors(tmp_path / "legacy" / "model-00001-of-000001.safetensors",
                    {k.removeprefix("model."): np.asarray(reader.get(k)) for k in reader.keys()})
  a = load_adapter(tmp_path / "new", cfg, params)
  b = load_adapter(tmp_path / "legacy", cfg, params)
  chex.assert_trees_all_equal(a, b)
  np.testing.assert_array_equal(np.asarray(a["layers_2"]["mlp"]["experts"]["up_proj"][5]),
                                2 * np.asarray(params["layers_2"]["mlp"]["experts"]["up_proj"][5]))


def test_lora_adapter_round_trip(tmp_path):
  cfg, params, _ = _setup()
  plan = TrainPlan("lora", lora_rank=4)
  factors = jax.tree_util.tree_map(lambda x: x + 0.01, init_trainable(plan, params))
  save_adapter(tmp_path, cfg, params, plan, factors)
  settings = json.loads((tmp_path / "adapter_config.json").read_text())
  assert settings["r"] == 4 and settings["lora_alpha"] == 8.0
  expected = merge_trainable(plan, params, factors)
  got = load_adapter(tmp_path, cfg, params)
  chex.assert_trees_all_close(expected, got, atol=1e-6, rtol=1e-7)


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
  cfg, params, _ = _setup()
  poisoned = cfg.vocab_size - 1  # a token whose embedding is NaN; the batches of steps 1, 2 and the validation
  params = jax.tree_util.tree_map(jnp.copy, params)  # batch avoid it, step 3's batch holds it
  params["embed_tokens"] = params["embed_tokens"].at[poisoned].set(jnp.nan)
  batches, val = _batches(cfg, 4), _batches(cfg, 1, seed=9)
  for batch in batches + val:
    batch["inputs"][batch["inputs"] == poisoned] = 3
  batches[2]["inputs"][0, 4] = poisoned
  stream, data_state, restore = replay(batches)
  best = []
  # Step 3 is neither logged, evaluated nor saved: its metrics are read while step 4 runs.
  train_cfg = TrainConfig(steps=6, lr=1e-2, grad_accum=1, eval_every=2, save_every=2, log_every=5,
                          compute_dtype="float32")
  with pytest.raises(ValueError, match=r"step 3: the training loss is nan, the gradient norm is nan; training "
                                       r"stopped without saving .* the last good checkpoint, step 2, is in"):
    train(cfg, params, _esft_plan(), stream, val, tmp_path, train_cfg, data_state=data_state,
          restore_data=restore, on_best=lambda trainable: best.append(trainable))
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [2]
  assert len(best) == 1 and all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(best[0]))
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert all(np.isfinite(value) for line in lines for value in line.values())


def test_resume_equals_uninterrupted_falling_back_from_a_corrupted_checkpoint(tmp_path, capsys):
  cfg, params, _ = _setup()
  plan = _esft_plan(shared=True)
  batches = _batches(cfg, 5)
  full = _run(cfg, params, plan, tmp_path / "full", 4, batches)
  _run(cfg, params, plan, tmp_path / "run", 3, batches)  # checkpoints at steps 2 and 3 (the last)
  for file in (tmp_path / "run" / "checkpoints" / "3").rglob("*"):
    if file.is_file():
      file.write_bytes(b"garbage")
  resumed = _run(cfg, params, plan, tmp_path / "run", 4, batches, resume=True)
  assert "Resuming from step 2, the newest that restores" in capsys.readouterr().out
  assert (full.first_step, full.steps, resumed.first_step, resumed.steps) == (0, 4, 2, 4)
  assert (tmp_path / "run" / "corrupt_checkpoints" / "3").is_dir()
  chex.assert_trees_all_equal(full.trainable, resumed.trainable)
  lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [line["step"] for line in lines if "loss" in line] == [1, 2, 3, 4]  # step 3's first line dropped


@pytest.mark.parametrize("field, value, flag", [
    ("steps", 0, "--steps"), ("lr", -1.0, "--lr"), ("lr", float("inf"), "--lr"), ("grad_accum", 0, "--grad-accum"),
    ("eval_every", 0, "--eval-every"), ("save_every", 0, "--save-every"), ("log_every", -1, "--log-every"),
    ("warmup_steps", -1, "--warmup-steps"), ("schedule", "linear", "--schedule")])
def test_train_config_refuses_bad_values_naming_the_option(field, value, flag):
  with pytest.raises(ValueError, match=f"{field}=.* \\({flag}\\)"):
    TrainConfig(**{field: value})
