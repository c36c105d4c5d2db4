"""Model pieces against simple references: expert paths, balance losses, packed segments, YaRN numbers,
the DeepSeek-V2-Lite shape and its parameter counts."""

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esft_jax.cli import main as cli_main
from esft_jax.config import load_config
from esft_jax.model.experts import expert_ffn, grouped_expert_ffn, reference_expert_ffn
from esft_jax.model.layers import rope_frequencies
from esft_jax.model.moe import Routing, batch_aux_loss, sequence_aux_loss
from esft_jax.model.transformer import Transformer, init_params, parameter_counts


def _experts(key, e, d, f):
  k1, k2, k3 = jax.random.split(key, 3)
  return {"gate_proj": jax.random.normal(k1, (e, d, f)) * 0.2, "up_proj": jax.random.normal(k2, (e, d, f)) * 0.2,
          "down_proj": jax.random.normal(k3, (e, f, d)) * 0.2}


@pytest.mark.parametrize("skewed", [False, True])
def test_grouped_experts_match_reference_values_and_gradients(skewed):
  t, k, e, d, f = 37, 3, 8, 16, 12
  key = jax.random.key(0)
  experts = _experts(key, e, d, f)
  x = jax.random.normal(jax.random.key(1), (t, d))
  if skewed:  # most tokens on experts 0-2; experts 6 and 7 get none
    ids = jax.random.randint(jax.random.key(2), (t, k), 0, 3)
    ids = ids.at[:, 1].set((ids[:, 0] + 1) % 3).at[:, 2].set(5)
  else:
    ids = jax.vmap(lambda kk: jax.random.permutation(kk, e)[:k])(jax.random.split(jax.random.key(2), t))
  w = jax.random.uniform(jax.random.key(3), (t, k))
  ref = reference_expert_ffn(x, ids, w, experts)
  np.testing.assert_allclose(grouped_expert_ffn(x, ids, w, experts), ref, atol=1e-5)
  np.testing.assert_allclose(jax.jit(grouped_expert_ffn)(x, ids, w, experts), ref, atol=1e-5)

  def loss(fn, x, experts):
    return jnp.sum(jnp.sin(fn(x, ids, w, experts)))

  g_ref = jax.grad(lambda x, p: loss(reference_expert_ffn, x, p), argnums=(0, 1))(x, experts)
  g_grp = jax.grad(lambda x, p: loss(grouped_expert_ffn, x, p), argnums=(0, 1))(x, experts)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g_ref, g_grp)
  if skewed:  # experts that received no token get exactly zero gradient
    assert float(jnp.abs(g_grp[1]["gate_proj"][6:]).max()) == 0.0


@pytest.mark.parametrize("impl", ["reference", "grouped"])
def test_expert_slices_compute_only_their_own_assignments(impl):
  """Expert parallelism's contract: a slice of the experts (global ids from a traced first_expert on) adds
  only its own assignments, so the slices' outputs and input gradients sum to the whole layer's, and each
  slice's weight gradients are the whole layer's rows of it."""
  t, k, e, d, f, ep = 37, 3, 8, 16, 12, 4
  experts = _experts(jax.random.key(0), e, d, f)
  x = jax.random.normal(jax.random.key(1), (t, d))
  ids = jax.vmap(lambda kk: jax.random.permutation(kk, e)[:k])(jax.random.split(jax.random.key(2), t))
  w = jax.random.uniform(jax.random.key(3), (t, k))
  cotangent = jax.random.normal(jax.random.key(4), (t, d))

  def out_and_grads(experts, first_expert):
    out, vjp = jax.vjp(lambda x_, w_, e_: expert_ffn(x_, ids, w_, e_, impl, first_expert=first_expert), x, w, experts)
    return out, *vjp(cotangent)

  whole = out_and_grads(experts, 0)
  n = e // ep
  sliced = [jax.jit(out_and_grads)({name: v[i * n:(i + 1) * n] for name, v in experts.items()}, i * n)
            for i in range(ep)]
  for summed, want in zip((sum(s[i] for s in sliced) for i in range(3)), whole[:3]):  # out, d/dx, d/dweights
    np.testing.assert_allclose(summed, want, atol=1e-5)
  for i, s in enumerate(sliced):
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b[i * n:(i + 1) * n], atol=1e-5), s[3], whole[3])


def test_sequence_aux_loss_matches_deepseek_formula():
  b, length, k, e = 3, 10, 2, 6
  rng = np.random.default_rng(0)
  probs = rng.dirichlet(np.ones(e), size=(b, length)).astype(np.float32)
  ids = np.argsort(-probs, axis=-1)[..., :k]
  routing = Routing(jnp.asarray(ids), jnp.asarray(np.take_along_axis(probs, ids, -1)), jnp.asarray(probs))
  expected = 0.0
  for seq in range(b):  # f_i = E/(K L) * count_i ; P_i = mean_t p_ti ; mean over sequences of sum_i f_i P_i
    counts = np.bincount(ids[seq].reshape(-1), minlength=e)
    expected += np.sum(counts * e / (k * length) * probs[seq].mean(0)) / b
  np.testing.assert_allclose(float(sequence_aux_loss(routing, e)), expected, rtol=1e-6)
  flat_counts = np.bincount(ids.reshape(-1), minlength=e) / ids.size * e
  np.testing.assert_allclose(float(batch_aux_loss(routing, e)), np.sum(flat_counts * probs.reshape(-1, e).mean(0)),
                             rtol=1e-6)


def test_packed_segments_do_not_see_each_other():
  cfg = load_config("tiny-deepseek")
  params = init_params(cfg, jax.random.key(0))
  apply = jax.jit(Transformer(cfg).apply)
  a = jax.random.randint(jax.random.key(1), (1, 5), 3, cfg.vocab_size)
  b = jax.random.randint(jax.random.key(2), (1, 4), 3, cfg.vocab_size)
  packed = jnp.concatenate([a, b], axis=1)
  segments = jnp.asarray([[1] * 5 + [2] * 4])
  positions = jnp.asarray([list(range(5)) + list(range(4))])
  out = apply({"params": params}, packed, segments, positions).logits
  alone_a = apply({"params": params}, a).logits
  alone_b = apply({"params": params}, b).logits
  np.testing.assert_allclose(out[:, :5], alone_a, atol=1e-5)
  np.testing.assert_allclose(out[:, 5:], alone_b, atol=1e-5)


def test_yarn_numbers_of_deepseek_v2_lite():
  cfg = load_config("deepseek-v2-lite")
  assert cfg.softmax_scale() == pytest.approx(0.114721, abs=1e-6)  # 192^-0.5 * mscale^2
  inv_freq, multiplier = rope_frequencies(cfg.rope, 64)
  assert multiplier == 1.0
  i = np.arange(32)
  ramp = np.clip((i - 10) / (23 - 10), 0, 1)  # correction range [10, 23]
  extra = 1.0 / 10000 ** (2 * i / 64)
  np.testing.assert_allclose(inv_freq, extra / 40 * ramp + extra * (1 - ramp), rtol=1e-6)


def test_deepseek_v2_lite_counts_and_reduced_depth_forward(capsys):
  cfg = load_config("deepseek-v2-lite")
  counts = parameter_counts(cfg)
  assert counts.total == 15_706_484_224  # 15.7B
  assert counts.active_per_token == 2_451_435_008  # 2.4B as DeepSeek reports (2.45B)
  cli_main(["info", "--model", "deepseek-v2-lite"])
  printed = capsys.readouterr().out
  assert "15.7B" in printed and "2.45B" in printed and "26 MoE" in printed and "top-6" in printed

  shallow = dataclasses.replace(cfg, num_layers=2, moe_layers=(False, True))
  params = init_params(shallow, jax.random.key(0), param_dtype=jnp.bfloat16)
  assert params["layers_1"]["mlp"]["experts"]["gate_proj"].shape == (64, 2048, 1408)
  tokens = jnp.asarray([[100000, 17, 2055, 9, 311, 64, 7, 100001]])
  out = jax.jit(Transformer(shallow, dtype=jnp.bfloat16).apply)({"params": params}, tokens)
  assert out.logits.shape == (1, 8, 102400) and bool(jnp.isfinite(out.logits).all())
  assert out.routing[0].expert_ids.shape == (1, 8, 6)
  assert 0 < float(out.aux_loss) < 1  # alpha * (about 1 for near-uniform routing)
