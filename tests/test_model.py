"""Model pieces against simple references: expert paths, balance losses, packed segments, YaRN numbers,
the DeepSeek-V2-Lite shape and its parameter counts."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from esft_jax.cli import main as cli_main
from esft_jax.config import load_config
from esft_jax.model.attention import (attention_mask, check_segments, dot_product_attention, fused_attention,
                                      most_segments, resolve_attention_impl, segment_counts, segment_spans)
from esft_jax.model.experts import expert_ffn, grouped_expert_ffn, reference_expert_ffn
from esft_jax.model.kernels import hopper_available
from esft_jax.model.layers import rope_frequencies
from esft_jax.model.moe import Routing, batch_aux_loss, sequence_aux_loss
from esft_jax.model.transformer import Transformer, init_params, parameter_counts


def _experts(key, e, d, f):
  k1, k2, k3 = jax.random.split(key, 3)
  return {"gate_proj": jax.random.normal(k1, (e, d, f)) * 0.2, "up_proj": jax.random.normal(k2, (e, d, f)) * 0.2,
          "down_proj": jax.random.normal(k3, (e, f, d)) * 0.2}


class GroupedExpertsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)  # the sort, the bincount and the scatter, eager and traced
  @parameterized.named_parameters(("even", False), ("skewed", True))
  def test_match_reference_values_and_gradients(self, skewed):
    t, k, e, d, f = 37, 3, 8, 16, 12
    experts = _experts(jax.random.key(0), e, d, f)
    x = jax.random.normal(jax.random.key(1), (t, d))
    if skewed:  # most tokens on experts 0-2; experts 6 and 7 get none
      ids = jax.random.randint(jax.random.key(2), (t, k), 0, 3)
      ids = ids.at[:, 1].set((ids[:, 0] + 1) % 3).at[:, 2].set(5)
    else:
      ids = jax.vmap(lambda kk: jax.random.permutation(kk, e)[:k])(jax.random.split(jax.random.key(2), t))
    w = jax.random.uniform(jax.random.key(3), (t, k))

    def out_and_grads(fn):
      def run(x, experts):
        loss = lambda x_, e_: jnp.sum(jnp.sin(fn(x_, ids, w, e_)))
        return fn(x, ids, w, experts), jax.grad(loss, argnums=(0, 1))(x, experts)
      return run

    want = out_and_grads(reference_expert_ffn)(x, experts)
    got = self.variant(out_and_grads(grouped_expert_ffn))(x, experts)
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-6)  # fp32, sums of at most 3 x 12 products
    if skewed:  # experts that received no token get exactly zero gradient
      assert float(jnp.abs(got[1][1]["gate_proj"][6:]).max()) == 0.0


def test_expert_weights_of_the_wrong_layout_are_named():
  experts = _experts(jax.random.key(0), 4, 8, 6)
  x, ids, w = jnp.ones((5, 8)), jnp.zeros((5, 2), jnp.int32), jnp.ones((5, 2))
  with pytest.raises(AssertionError, match=r"down_proj \[E, F, D\]"):
    expert_ffn(x, ids, w, dict(experts, down_proj=experts["down_proj"].transpose(0, 2, 1)))
  with pytest.raises(AssertionError, match=r"tokens \[T, D\]"):
    expert_ffn(jnp.ones((5, 6)), ids, w, experts)


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
  summed = tuple(sum(s[i] for s in sliced) for i in range(3))  # out, d/dx, d/dweights
  chex.assert_trees_all_close(summed, whole[:3], atol=1e-5, rtol=1e-6)
  for i, s in enumerate(sliced):
    rows = jax.tree_util.tree_map(lambda g: g[i * n:(i + 1) * n], whole[3])
    chex.assert_trees_all_close(s[3], rows, atol=1e-5, rtol=1e-6)


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


# On a GPU the fused path is cuDNN's flash attention, which takes 16-bit inputs; elsewhere XLA's, in fp32.
ON_GPU = jax.default_backend() == "gpu"
ATTENTION_DTYPE, ATTENTION_TOL = (jnp.bfloat16, 2e-2) if ON_GPU else (jnp.float32, 1e-5)


def _cudnn_like_attention(query, key, value, mask, scale, is_causal, implementation):
  """How cuDNN's flash attention treats a mask and `is_causal`: the mask is a large finite negative bias, while
  the keys above the diagonal are dropped outright (so a row the mask blocks entirely averages keys 0..i only)."""
  del implementation
  group = query.shape[2] // key.shape[2]
  key, value = jnp.repeat(key, group, axis=2), jnp.repeat(value, group, axis=2)
  scores = jnp.einsum("bqhd,bkhd->bhqk", query, key).astype(jnp.float32) * scale + jnp.where(mask, 0.0, -2.0 ** 41)
  q_len, k_len = scores.shape[-2:]
  if is_causal:
    scores = jnp.where(jnp.tril(jnp.ones((q_len, k_len), bool)), scores, -jnp.inf)
  return jnp.einsum("bhqk,bkhv->bqhv", jax.nn.softmax(scores, axis=-1).astype(value.dtype), value)


# Rows with packed documents, padding between and after them, and no tokens at all; and rows of one document
# each, first in its row, as the fused path built for one segment per row takes them.
PACKED_ROWS = [[1] * 5 + [2] * 5 + [0] * 2, [1] * 12, [0] * 12, [3] * 4 + [0] * 3 + [4] * 5]
ONE_PER_ROW = [[1] * 9 + [0] * 3, [1] * 12, [0] * 12]


# `like_cudnn` matters where the mask travels as a bias: without a bound (and, on a GPU, with a window).
@pytest.mark.parametrize("rows, max_segments, like_cudnn", [(PACKED_ROWS, None, False), (PACKED_ROWS, None, True),
                                                            (PACKED_ROWS, 2, False), (PACKED_ROWS, 5, False),
                                                            (ONE_PER_ROW, 1, False)])
@pytest.mark.parametrize("heads, kv_heads, d, v_width, window",
                         [(4, 4, 24, 16, None), (4, 2, 16, 24, None), (4, 2, 16, 24, 5)])
def test_fused_attention_matches_the_reference(heads, kv_heads, d, v_width, window, rows, max_segments, like_cudnn,
                                               monkeypatch):
  """Values and gradients on random inputs: MLA-like narrower values, grouped queries, wider values, a sliding
  window, packed documents with padding, whose rows average every key in both; no bound on the segments, the
  bound at its least and looser. With a bound, on a GPU without a window, the fused path is cuDNN's given the
  segments; otherwise jax.nn's with a mask, where `like_cudnn` stands in cuDNN's handling of masks (on a CPU the
  fused path is XLA's, which treats them as the reference does)."""
  if like_cudnn:
    monkeypatch.setattr(jax.nn, "dot_product_attention", _cudnn_like_attention)
  segments = jnp.asarray(rows)
  b, length = segments.shape
  keys = jax.random.split(jax.random.key(heads + kv_heads + d + v_width), 4)
  q = jax.random.normal(keys[0], (b, length, heads, d), ATTENTION_DTYPE)
  k = jax.random.normal(keys[1], (b, length, kv_heads, d), ATTENTION_DTYPE)
  v = jax.random.normal(keys[2], (b, length, kv_heads, v_width), ATTENTION_DTYPE)
  cotangent = jax.random.normal(keys[3], (b, length, heads, v_width), ATTENTION_DTYPE)
  reference = lambda q, k, v: dot_product_attention(q, k, v, attention_mask(segments, window), d ** -0.5)
  fused = lambda q, k, v: fused_attention(q, k, v, segments, window, d ** -0.5, max_segments)

  def with_grads(fn):
    out, pullback = jax.vjp(fn, q, k, v)
    return (out, *pullback(cotangent))

  want = with_grads(reference)
  got = jax.jit(lambda: with_grads(fused))()
  for g, w in zip(got, want):  # the output, then the gradients of q, k and v, each to its own scale
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    np.testing.assert_allclose(g, w, rtol=ATTENTION_TOL, atol=ATTENTION_TOL * np.abs(w).max())


def test_fused_attention_turns_the_rows_past_its_bound_into_nan_and_callers_get_a_clear_error():
  """Built for one segment per row, a row of two documents and a row that starts with padding are NaN (their
  padding keeps the reference's average), the others are computed; `check_segments` names the row and the flag."""
  segments = jnp.asarray([[1] * 4 + [2] * 4, [1] * 8, [0] * 2 + [1] * 6, [1] * 5 + [0] * 3])
  q = k = v = jax.random.normal(jax.random.key(0), (4, 8, 2, 16), ATTENTION_DTYPE)
  out = np.asarray(jax.jit(fused_attention, static_argnums=(4, 5, 6))(q, k, v, segments, None, 0.25, 1),
                   np.float32)
  nan_rows = np.isnan(out).any(axis=(1, 2, 3))
  assert list(nan_rows) == [True, False, True, False]
  assert np.isfinite(out[2, :2]).all() and np.isnan(out[2, 2:]).all()
  with pytest.raises(ValueError, match=r"batch 3: row 0 packs 2 segments, but the fused attention was built for at "
                                       r"most max_segments=1 per row: set max_segments to 2 or more"):
    check_segments(segments, 1, "batch 3")
  with pytest.raises(ValueError, match="batch 3: row 1 starts with padding, .* set max_segments to 2 or more"):
    check_segments(segments[1:], 1, "batch 3")
  check_segments(segments, 2, "batch 3")
  np.testing.assert_array_equal(segment_counts(segments, 1)[0], [2, 1, 1, 1])
  assert most_segments(segments) == 2 and most_segments(np.zeros((2, 8), np.int32)) == 1
  with pytest.raises(ValueError, match="max_segments=0: .* pass 1 or more"):
    fused_attention(q, k, v, segments, None, 0.25, 0)


def test_gradient_where_passes_values_and_zeroes_the_gradient_outside_keep():
  """cuDNN leaves its gradients at padding unwritten; `_gradient_where` zeroes them, NaN included."""
  from esft_jax.model.attention import _gradient_where
  x = jax.random.normal(jax.random.key(0), (2, 3, 4))
  keep = jnp.asarray([[True, False, True], [False, False, True]])
  out, pullback = jax.vjp(lambda x: _gradient_where(x, keep), x)
  np.testing.assert_array_equal(out, x)
  cotangent = jnp.full_like(x, jnp.nan).at[keep].set(2.0)
  np.testing.assert_array_equal(pullback(cotangent)[0], jnp.where(keep[..., None], 2.0, 0.0) * jnp.ones_like(x))


def test_segment_spans_match_a_loop():
  """cuDNN's packed layout (start offsets and lengths of each row's segments, -1 after the last) against a loop
  over the tokens; a row with more segments than the bound keeps its first ones."""
  rows = [[1, 1, 2, 2, 2, 3, 0, 0], [5] * 8, [1, 2, 3, 4, 0, 0, 0, 0], [0] * 8, [2, 2, 7, 0, 0, 0, 0, 9]]
  max_segments = 3
  offsets, lengths = segment_spans(jnp.asarray(rows, jnp.int32), max_segments)
  for row, got_offsets, got_lengths in zip(rows, np.asarray(offsets), np.asarray(lengths)):
    starts = [t for t, s in enumerate(row) if s != 0 and (t == 0 or row[t - 1] != s)][:max_segments]
    sizes = [next((u for u in range(t, len(row)) if row[u] != row[t]), len(row)) - t for t in starts]
    assert list(got_offsets) == starts + [-1] * (max_segments + 1 - len(starts)), row
    assert list(got_lengths) == sizes + [-1] * (max_segments - len(sizes)), row


@pytest.mark.parametrize("max_segments", [None, 2])
def test_fused_attention_in_the_model_matches_the_reference(max_segments):
  cfg = load_config("tiny-deepseek")
  params = init_params(cfg, jax.random.key(0), param_dtype=ATTENTION_DTYPE)
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 3, cfg.vocab_size)
  segments = jnp.asarray([[1] * 9 + [2] * 7, [1] * 13 + [0] * 3])
  positions = jnp.asarray([list(range(9)) + list(range(7)), list(range(16))])
  out = {impl: jax.jit(Transformer(cfg, dtype=ATTENTION_DTYPE, attention_impl=impl,
                                    max_segments=max_segments).apply)(
      {"params": params}, tokens, segments, positions).logits for impl in ("reference", "fused")}
  valid = np.asarray(segments != 0)
  np.testing.assert_allclose(out["fused"][valid], out["reference"][valid], rtol=ATTENTION_TOL,
                             atol=ATTENTION_TOL * 10)


def test_attention_impl_choice():
  assert resolve_attention_impl("auto", jnp.bfloat16) == ("fused" if hopper_available() else "reference")
  assert resolve_attention_impl("auto", jnp.float32) == "reference"
  assert resolve_attention_impl("fused", jnp.bfloat16) == "fused"
  with pytest.raises(ValueError, match="attention_impl='flash': expected one of"):
    resolve_attention_impl("flash", jnp.float32)


def test_fused_attention_on_a_gpu_asks_for_16_bits_and_auto_for_a_hopper(monkeypatch):
  from esft_jax.model import attention

  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(attention, "hopper_available", lambda: True)
  assert resolve_attention_impl("auto", jnp.bfloat16) == "fused"
  assert resolve_attention_impl("auto", jnp.float32) == "reference"
  with pytest.raises(ValueError, match="takes bfloat16 or float16, not float32: compute in bfloat16"):
    resolve_attention_impl("fused", jnp.float32)
  monkeypatch.setattr(attention, "hopper_available", lambda: False)  # older GPUs' cuDNN: no 192-wide MLA heads
  assert resolve_attention_impl("auto", jnp.bfloat16) == "reference"


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
