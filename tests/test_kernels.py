"""The GPU expert kernels against the reference path, forward and gradients, at bf16 tolerance on random inputs.

The kernels need a Hopper GPU: those tests skip elsewhere. On CPU run the row layout, the tiled forward kernel and
the row-gather kernel in Pallas' GPU interpreter, "auto" choosing "grouped", and the benchmark's tiny smoke run."""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esft_jax.model.experts import expert_ffn
from esft_jax.model.kernels import hopper_available
from esft_jax.model.kernels.layout import combine, dispatch, expert_layout, padded_rows, take_rows
from esft_jax.model.kernels.tiled import WEIGHT_GRAD_TILES, TileConfig
from tests.jaxprs import scatters

REPO = Path(__file__).resolve().parents[1]
needs_hopper = pytest.mark.skipif(
  not hopper_available(), reason=f"the Mosaic GPU kernels need a Hopper GPU; the default device is {jax.devices()[0]}"
)


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def routing(rng, tokens: int, k: int, experts: int, skewed: bool) -> np.ndarray:
  """Distinct top-k ids; skewed: popularity ~ Dirichlet(0.5) over all but the last two experts (which get none)."""
  if not skewed:
    return np.stack([rng.choice(experts, k, replace=False) for _ in range(tokens)]).astype(np.int32)
  popularity = rng.dirichlet(np.full(experts - 2, 0.5))
  return np.stack([rng.choice(experts - 2, k, replace=False, p=popularity) for _ in range(tokens)]).astype(np.int32)


def moe_inputs(rng, tokens: int, k: int, experts: int, d: int, f: int, skewed: bool):
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  x = jnp.asarray(normal(tokens, d), jnp.bfloat16)
  ids = jnp.asarray(routing(rng, tokens, k, experts, skewed))
  gates = rng.random((tokens, k)).astype(np.float32)
  weights = jnp.asarray(gates / gates.sum(1, keepdims=True))
  experts_ = {
    "gate_proj": jnp.asarray(normal(experts, d, f) / np.sqrt(d), jnp.bfloat16),
    "up_proj": jnp.asarray(normal(experts, d, f) / np.sqrt(d), jnp.bfloat16),
    "down_proj": jnp.asarray(normal(experts, f, d) / np.sqrt(f), jnp.bfloat16),
  }
  return x, ids, weights, experts_


@pytest.mark.parametrize("align", [1, 128])
def test_layout_puts_each_assignment_in_its_experts_aligned_group(align):
  rng = np.random.default_rng(0)
  tokens, k, experts = 37, 3, 5
  ids = routing(rng, tokens, k, experts, skewed=True)
  layout = expert_layout(jnp.asarray(ids), experts, align)
  sizes = np.asarray(layout.group_sizes_G)
  counts = np.bincount(ids.reshape(-1), minlength=experts)
  assert np.all(sizes % align == 0) and np.all(sizes >= counts) and np.all(sizes - counts < align)
  assert layout.source_P.shape == (padded_rows(tokens * k, experts, align),) and sizes.sum() <= len(layout.source_P)
  starts = np.cumsum(sizes) - sizes
  dest, source = np.asarray(layout.dest_TxK), np.asarray(layout.source_P)
  assert len(np.unique(dest)) == tokens * k
  assert np.all(dest >= starts[ids]) and np.all(dest < starts[ids] + sizes[ids])
  np.testing.assert_array_equal(source[dest], np.repeat(np.arange(tokens), k).reshape(tokens, k))
  assert np.sum(source == tokens) == len(source) - tokens * k


@pytest.mark.parametrize("align", [1, 128])
def test_layout_gives_experts_elsewhere_no_row(align):
  """Expert parallelism: ids outside [0, E) (experts on other devices) get no row, their dest one past the last
  row; the groups hold exactly the other assignments, so the grouped matmuls skip the rest."""
  rng = np.random.default_rng(8)
  tokens, k, experts = 37, 3, 4
  ids = routing(rng, tokens, k, 2 * experts, skewed=False) - 2  # ids -2 .. 5: 0-3 here
  layout = expert_layout(jnp.asarray(ids), experts, align)
  here = (ids >= 0) & (ids < experts)
  sizes, dest, source = np.asarray(layout.group_sizes_G), np.asarray(layout.dest_TxK), np.asarray(layout.source_P)
  counts = np.bincount(ids[here], minlength=experts)
  assert np.all(sizes % align == 0) and np.all(sizes >= counts) and np.all(sizes - counts < align)
  assert np.all(dest[~here] == len(source)) and np.all(dest[here] < sizes.sum())
  starts = np.cumsum(sizes) - sizes
  assert np.all(dest[here] >= starts[ids[here]]) and np.all(dest[here] < (starts + sizes)[ids[here]])
  np.testing.assert_array_equal(source[dest[here]], np.nonzero(here)[0])
  assert np.sum(source < tokens) == here.sum()


def interpreted_gather(src_NxD, index_M, scale_M=None):
  from esft_jax.model.kernels.gather import gather_rows

  return gather_rows(src_NxD, index_M, scale_M, interpret=True)


@pytest.mark.parametrize("gather", [take_rows, interpreted_gather], ids=["take", "kernel"])
@pytest.mark.parametrize("align", [1, 128])
def test_dispatch_and_combine_match_take_in_values_and_gradients(align, gather):
  """The layout's row gathers, whose gradients are gathers too, against `jnp.take` and its scatter-add gradient:
  experts elsewhere (expert parallelism), padding rows and skewed routing included; with XLA's gather and with
  the gather kernel (in Pallas' interpreter)."""
  rng = np.random.default_rng(9)
  tokens, k, experts, d = 37, 3, 4, 1024
  ids = routing(rng, tokens, k, 2 * experts, skewed=True) - 2  # ids -2 .. 5: 0-3 here
  layout = expert_layout(jnp.asarray(ids), experts, align)
  take = lambda src, index: jnp.take(src, index, axis=0, mode="fill", fill_value=0)
  weights = jnp.asarray(rng.random((tokens, k)), jnp.float32)
  rows = len(layout.assignment_P)
  real = np.asarray(layout.source_P) < tokens  # padding rows may hold any token's values
  cases = [(lambda x, w: dispatch(x, layout, gather), lambda x, w: take(x, layout.source_P), (tokens, d), real),
           (lambda y, w: combine(y, w, layout, gather),
            lambda y, w: jnp.sum(take(y, layout.dest_TxK) * w[..., None], axis=1), (rows, d), slice(None))]
  for fast, simple, shape, compared in cases:
    src = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    out, vjp = jax.vjp(jax.jit(fast), src, weights)
    want, want_vjp = jax.vjp(simple, src, weights)
    np.testing.assert_allclose(out[compared], want[compared], rtol=1e-6, atol=1e-6)
    cotangent = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
    # The weights' gradient sums d = 1024 products in fp32 in another order than the reference: rounding of a few
    # 1e-5 on entries of size ~30.
    for grad, want_grad in zip(vjp(cotangent), want_vjp(cotangent)):
      np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaled"])
@pytest.mark.parametrize("n, d, m", [(37, 1024, 128), (50, 2048, 40), (9, 1024, 24)])
def test_gather_kernel_interpreted(n, d, m, scaled):
  """The row-gather kernel in Pallas' interpreter against take_rows: indices out of range (clipped), chunks of
  several rows, several stages per block, and a row count with an odd factor."""
  from esft_jax.model.kernels.gather import gather_rows

  rng = np.random.default_rng(n)
  src = jnp.asarray(rng.standard_normal((n, d)), jnp.bfloat16)
  index = jnp.asarray(rng.integers(-3, n + 3, m), jnp.int32)
  scale = jnp.asarray(rng.standard_normal(m), jnp.float32) if scaled else None
  np.testing.assert_array_equal(gather_rows(src, index, scale, interpret=True), take_rows(src, index, scale))


@needs_hopper
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_gather_kernel_matches_take_on_gpu(dtype):
  """The row-gather kernel on the GPU at DeepSeek-V2-Lite's width, plain and scaled (the combine's backward, with
  zero scales for padding rows), against take_rows: exactly equal."""
  from esft_jax.model.kernels.gather import gather_rows

  rng = np.random.default_rng(3)
  src = jnp.asarray(rng.standard_normal((1000, 2048)), dtype)
  index = jnp.asarray(rng.integers(-5, 1005, 6 * 1024), jnp.int32)
  scale = jnp.asarray(rng.standard_normal(6 * 1024) * (rng.random(6 * 1024) < 0.9), jnp.float32)
  np.testing.assert_array_equal(gather_rows(src, index), take_rows(src, index))
  np.testing.assert_array_equal(gather_rows(src, index, scale), take_rows(src, index, scale))


def test_gpu_expert_ffn_forward_interpreted():
  """The whole expert FFN on the tiled kernels in the interpreter (layout, gathers, gate and up in one kernel, the
  down projection), against the reference: skewed routing, experts with no token, groups of 43 and 53 rows (a
  group's last tile holding its top 64 rows where groups align to 64). Its backward reads weights transposed, which
  the interpreter cannot run (the Hopper tests below cover it)."""
  from esft_jax.model.kernels.ffn import gpu_expert_ffn

  x, ids, weights, experts = moe_inputs(np.random.default_rng(12), 96, 2, 6, 128, 128, skewed=True)
  counts = np.bincount(np.asarray(ids).ravel(), minlength=6)
  assert counts.min() == 0 and np.any((counts % 128 > 0) & (counts % 128 <= 64))  # an empty expert; half tiles
  out = gpu_expert_ffn(x, ids, weights, experts, interpret=True)
  assert rel_err(out, expert_ffn(x, ids, weights, experts, impl="reference")) < 2e-2


@pytest.mark.parametrize("odd_one", ["gate_proj", "up_proj", "down_proj"])
def test_swiglu_with_a_float32_weight_falls_back_to_ragged_dot(odd_one):
  """One float32 weight among bf16 ones takes XLA's ragged_dot for the whole SwiGLU rather than the kernels (which
  need one 16-bit dtype): the output is the reference's."""
  from esft_jax.model.kernels.ffn import gpu_expert_ffn

  x, ids, weights, experts = moe_inputs(np.random.default_rng(11), 64, 2, 4, 128, 128, skewed=False)
  experts[odd_one] = experts[odd_one].astype(jnp.float32)
  out = gpu_expert_ffn(x, ids, weights, experts, interpret=True)
  assert rel_err(out, expert_ffn(x, ids, weights, experts, impl="reference")) < 2e-2


def test_expert_backward_scatters_no_activations():
  """On the kernels' path, the gradients of dispatch and combine are gathers: the backward's only scatters are the
  layout's own integer ones (autodiff of a gather would scatter-add [rows, D] activations)."""
  from esft_jax.model.kernels.ffn import gpu_expert_ffn

  x, ids, weights, experts = moe_inputs(np.random.default_rng(10), 64, 2, 4, 128, 128, skewed=False)
  loss = lambda *a: jnp.sum(gpu_expert_ffn(a[0], ids, *a[1:], interpret=True).astype(jnp.float32))
  found = scatters(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(x, weights, experts))
  assert found and all(jnp.issubdtype(operand.dtype, jnp.integer) for _, operand in found), found


# Groups of the interpreted kernel tests, 320 rows of 512: an empty group, and half tiles (a group's last 64 rows)
# beside whole ones, within the rows and last; row tiles past the last group are skipped, their rows left unwritten.
HALF_TILE_SIZES = np.asarray([192, 0, 64, 64], np.int32)


def test_row_tiles_cut_each_group_and_hold_its_last_rows():
  from esft_jax.model.kernels import tiled

  first_row, rows, group = tiled.row_tiles(HALF_TILE_SIZES, 128, 6)
  np.testing.assert_array_equal(first_row[:4], [0, 128, 192, 256])
  np.testing.assert_array_equal(rows, [128, 64, 64, 64, 0, 0])  # 0: past the last group, skipped
  np.testing.assert_array_equal(group[:4], [0, 0, 2, 3])
  first_row, rows, group = tiled.row_tiles(jnp.asarray([256, 128]), 64, 7)  # 64-row tiles: never a half
  np.testing.assert_array_equal(rows, [64] * 6 + [0])
  np.testing.assert_array_equal(first_row[:6], [0, 64, 128, 192, 256, 320])


# Blocks shared by both warpgroups (split along m or n; whole tiles or in pieces) and ping-pong blocks: whole, and in
# pieces of 32 as forward_config's (its swiglu_grad pick is in SIDE_TILES)
FORWARD_TILES = [TileConfig(64, 128, "m"), TileConfig(128, 128, "n"), TileConfig(128, 128, "n", store_n=16),
                 TileConfig(64, 256, "m"), TileConfig(64, 128, "m", store_n=32), TileConfig(128, 128, "pingpong"),
                 TileConfig(128, 128, "pingpong", store_n=32, max_stages=8)]


@pytest.mark.parametrize("cfg", FORWARD_TILES, ids=str)
def test_tiled_forward_kernel_interpreted(cfg):
  """The forward kernel in Pallas' GPU interpreter (CPU), each of FORWARD_TILES, on HALF_TILE_SIZES' groups."""
  from esft_jax.model.kernels import tiled

  rng = np.random.default_rng(1)
  sizes = HALF_TILE_SIZES
  lhs_PxK = jnp.asarray(rng.standard_normal((512, 128)), jnp.bfloat16)
  rhs_GxKxN = jnp.asarray(rng.standard_normal((4, 128, 256)) / 11, jnp.bfloat16)
  out = tiled.grouped_forward(lhs_PxK, rhs_GxKxN, sizes, transpose_rhs=False, cfg=cfg, interpret=True)
  want = jax.lax.ragged_dot(lhs_PxK, rhs_GxKxN, sizes, preferred_element_type=jnp.float32)
  assert rel_err(out[:320], want[:320]) < 1e-2
  assert np.all(np.isnan(np.asarray(out[320:], np.float32)))  # unwritten: the interpreter's fresh buffers hold NaN


def test_output_pieces_leave_room_for_a_pipeline_stage():
  """Staged 16 columns at a time, a 128 x 256 block's output fits a 4th stage of 48 KB where whole tiles leave 3; a
  64 x 256 tile per warpgroup with two side arrays fits 3 stages only in pieces. The pieces must divide the tile."""
  from esft_jax.model.kernels import tiled

  whole, slots = TileConfig(128, 128, "n"), tiled._slots(1, tiled.EPILOGUES["products"])
  assert (whole.stages(2, 1, slots), dataclasses.replace(whole, store_n=16).stages(2, 1, slots)) == (3, 4)
  wide, slots = TileConfig(64, 256, "m"), tiled._slots(1, tiled.EPILOGUES["swiglu_grad"])
  assert (wide.stages(2, 1, slots), dataclasses.replace(wide, store_n=64).stages(2, 1, slots)) == (1, 3)
  zeros = jnp.zeros((256, 128), jnp.bfloat16), jnp.zeros((2, 256, 128), jnp.bfloat16)
  with pytest.raises(ValueError, match="1 pipeline stage.*must exceed delay_release=1"):
    tiled.grouped_forward(*zeros, jnp.asarray([128, 128]), transpose_rhs=True, cfg=wide, interpret=True,
                          epilogue="swiglu_grad", sides=(jnp.zeros((256, 256), jnp.bfloat16),) * 2)
  with pytest.raises(ValueError, match="must divide tile_n"):
    TileConfig(64, 128, "m", store_n=48)


def test_misnamed_tiles_and_epilogues_are_refused():
  from esft_jax.model.kernels import tiled

  with pytest.raises(ValueError, match="split='x' must be 'm'"):
    TileConfig(64, 128, "x")
  with pytest.raises(ValueError, match="epilogue 'swiglu-grad' is unknown; use one of"):
    tiled.forward_config("swiglu-grad")


def test_interpreter_refuses_tiles_past_the_output_width():
  """The GPU runs a last column tile past n (TMA zero-fills and drops); Pallas' interpreter cannot, so it refuses
  such tiles (forward_config's 128-wide blocks divide every width the kernels take)."""
  from esft_jax.model.kernels import tiled

  lhs_PxK, rhs_GxKxN = jnp.zeros((256, 128), jnp.bfloat16), jnp.zeros((2, 128, 384), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"interpreter cannot run a column tile past n=384 \(block_n=256\)"):
    tiled.grouped_forward(lhs_PxK, rhs_GxKxN, jnp.asarray([128, 128]), transpose_rhs=False,
                          cfg=TileConfig(64, 256, "m"), interpret=True)


def test_forward_config_follows_the_measured_rules():
  """The tiles BENCHMARKS.md's kernel choices found fastest: 128 x 128 ping-pong blocks, staged in pieces of 16
  columns beside swiglu_grad's two side arrays and of 32 otherwise; for the SwiGLU's sum of two terms, 128 x 256
  blocks both warpgroups share."""
  from esft_jax.model.kernels import tiled

  picks = {epilogue: str(tiled.forward_config(epilogue)) for epilogue in ("products", "swiglu_grad")}
  assert picks == {"products": "128x128pingpong-stages8-store32", "swiglu_grad": "128x128pingpong-stages8-store16"}
  for epilogue in ("products", "swiglu_grad"):  # beside the staging, 5 stages of 32 KB fit
    assert tiled.forward_config(epilogue).stages(2, 1, tiled._slots(1, tiled.EPILOGUES[epilogue])) == 5
  assert tiled.SUM_OF_TERMS_TILES in FORWARD_TILES  # so the GPU test checks the shipped tiles' sum of terms


def test_tiled_kernels_refuse_mixed_dtypes():
  """A float32 weight stack beside bfloat16 rows (a bf16 array divided by a NumPy scalar, say) is named in the error
  rather than failing deep in Mosaic's swizzle checks."""
  from esft_jax.model.kernels import tiled

  lhs_PxK, sizes = jnp.zeros((256, 128), jnp.bfloat16), jnp.asarray([128, 128])
  with pytest.raises(ValueError, match=r"grouped_forward: .*\['bfloat16', 'float32'\]"):
    tiled.grouped_forward(lhs_PxK, jnp.zeros((2, 128, 128), jnp.float32), sizes, transpose_rhs=False,
                          cfg=TileConfig(128, 128, "n"), interpret=True)
  with pytest.raises(ValueError, match="grouped_weight_grad: .*float32"):
    tiled.grouped_weight_grad(lhs_PxK, jnp.zeros((256, 128), jnp.float32), sizes, cfg=tiled.WEIGHT_GRAD_TILES,
                              interpret=True)


@pytest.mark.parametrize("cfg", [TileConfig(64, 128, "m"), TileConfig(64, 128, "m", store_n=32),
                                 TileConfig(64, 128, "pingpong", store_n=32)], ids=str)
def test_tiled_forward_of_two_stacks_interpreted(cfg):
  """Gate and up in one kernel (each lhs tile loaded once for both), in the interpreter: each product as
  ragged_dot's; with the "swiglu" epilogue, silu(gate) * up and its partial derivatives
  in gate and up. Outputs staged as whole tiles, in pieces of 32 columns, and on ping-pong blocks."""
  from esft_jax.model.kernels import tiled

  rng = np.random.default_rng(2)
  sizes = HALF_TILE_SIZES
  lhs_PxK = jnp.asarray(rng.standard_normal((512, 128)), jnp.bfloat16)
  stacks = tuple(jnp.asarray(rng.standard_normal((4, 128, 256)) / 11, jnp.bfloat16) for _ in range(2))
  outs = tiled.grouped_forward(lhs_PxK, stacks, sizes, transpose_rhs=False, cfg=cfg, interpret=True)
  assert isinstance(outs, tuple) and len(outs) == 2
  wants = [jax.lax.ragged_dot(lhs_PxK, rhs_GxKxN, sizes, preferred_element_type=jnp.float32) for rhs_GxKxN in stacks]
  for out, want in zip(outs, wants):
    assert rel_err(out[:320], want[:320]) < 1e-2
    assert np.all(np.isnan(np.asarray(out[320:], np.float32)))
  swiglu_outs = tiled.grouped_forward(lhs_PxK, stacks, sizes, transpose_rhs=False, cfg=cfg, interpret=True,
                                      epilogue="swiglu")
  hidden, hidden_vjp = jax.vjp(lambda gate, up: jax.nn.silu(gate) * up, *wants)
  for out, want in zip(swiglu_outs, (*hidden_vjp(jnp.ones_like(hidden)), hidden), strict=True):
    assert rel_err(out[:320], want[:320]) < 1e-2


@pytest.mark.parametrize("cfg", [TileConfig(64, 128, "m"), TileConfig(128, 128, "pingpong", store_n=32, max_stages=8)],
                         ids=str)
def test_tiled_forward_of_a_sum_of_terms_interpreted(cfg):
  """lhs1 @ rhs1 + lhs2 @ rhs2 in one kernel (the SwiGLU's dgate @ gate.T + dup @ up.T), the terms' K blocks taken in
  turn into one accumulator, K of 128 and 256, in the interpreter, on HALF_TILE_SIZES' groups."""
  from esft_jax.model.kernels import tiled

  rng = np.random.default_rng(4)
  sizes = HALF_TILE_SIZES
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  lhs_terms, rhs_terms = (normal(512, 128), normal(512, 256)), (normal(4, 128, 256) / 11, normal(4, 256, 256) / 16)
  out = tiled.grouped_forward(lhs_terms, rhs_terms, sizes, transpose_rhs=False, cfg=cfg, interpret=True)
  want = sum(jax.lax.ragged_dot(lhs, rhs, sizes, preferred_element_type=jnp.float32)
             for lhs, rhs in zip(lhs_terms, rhs_terms))
  assert rel_err(out[:320], want[:320]) < 1e-2
  with pytest.raises(ValueError, match="2 lhs terms need as many rhs stacks, got 1"):
    tiled.grouped_forward(lhs_terms, rhs_terms[0], sizes, transpose_rhs=False, cfg=cfg, interpret=True)


# Side arrays staged as whole tiles, and in 4 pieces (the 3rd and 4th loaded in the epilogue); forward_config's
# swiglu_grad pick: ping-pong blocks in 8 pieces
SIDE_TILES = [TileConfig(64, 128, "m"), TileConfig(64, 256, "m", store_n=64), TileConfig(128, 128, "n", store_n=32),
              TileConfig(128, 128, "pingpong", store_n=16, max_stages=8)]


@pytest.mark.parametrize("cfg", SIDE_TILES, ids=str)
def test_epilogue_with_side_arrays_interpreted(cfg):
  """The epilogue that reads other arrays' tiles (loaded while the product accumulates), in the interpreter on the
  forward kernel (the input-gradient kernel that uses it on the GPU cannot run there): dgate and dup from the
  hidden's gradient and its partial derivatives. Sides and outputs staged as whole tiles or in pieces."""
  from esft_jax.model.kernels import tiled

  rng = np.random.default_rng(5)
  sizes = HALF_TILE_SIZES
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  lhs_PxK, rhs_GxKxN = normal(512, 128), normal(4, 128, 256) / 11
  sides = tuple(normal(512, 256) for _ in range(2))
  outs = tiled.grouped_forward(lhs_PxK, rhs_GxKxN, sizes, transpose_rhs=False, cfg=cfg, interpret=True,
                               epilogue="swiglu_grad", sides=sides)
  product = jax.lax.ragged_dot(lhs_PxK, rhs_GxKxN, sizes, preferred_element_type=jnp.float32)
  wants = tuple(product * side.astype(jnp.float32) for side in sides)
  for out, want in zip(outs, wants, strict=True):
    assert rel_err(out[:320], want[:320]) < 1e-2
    assert np.all(np.isnan(np.asarray(out[320:], np.float32)))


def test_layers_share_one_lowered_kernel():
  """A model's layers call the same kernels: each is lowered once per program, not once per call."""
  from esft_jax.model.kernels import tiled

  sizes = jnp.asarray([128, 128], jnp.int32)
  rhs_GxKxN = jnp.ones((2, 128, 128), jnp.bfloat16)

  def lowered_chars(layers: int) -> int:
    def chain(x):
      for _ in range(layers):
        x = tiled.grouped_forward(x, rhs_GxKxN, sizes, transpose_rhs=False, cfg=tiled.forward_config(),
                                  interpret=True)
      return x

    return len(jax.jit(chain).lower(jnp.ones((256, 128), jnp.bfloat16)).as_text())

  assert lowered_chars(4) < 1.2 * lowered_chars(1)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="lowers for a GPU that is not there")
@pytest.mark.parametrize("trained_experts", [None, (1, 3)])
def test_kernels_lower_for_hopper_on_a_cpu(monkeypatch, trained_experts):
  """The expert FFN's value and gradients lower for CUDA from a CPU, through Mosaic GPU's Python lowering of every
  kernel (layouts, swizzles, barriers and TMA descriptors), where the interpreter checks none of that: widths 256
  and 384 (column tiles past the width), skewed routing, and weight gradients for all experts or two."""
  from esft_jax.model.kernels import ffn, mosaic

  monkeypatch.setattr(ffn, "hopper_available", lambda: True)
  monkeypatch.setattr(mosaic, "blocks", lambda interpret: 132)  # an H100's or H200's multiprocessors
  x, ids, weights, experts = moe_inputs(np.random.default_rng(11), 300, 4, 8, 256, 384, skewed=True)

  def loss(x_, w_, e_):
    y = ffn.gpu_expert_ffn(x_, ids, w_, e_, trained_experts=trained_experts)
    return jnp.sum(y.astype(jnp.float32))

  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, weights, experts).lower(lowering_platforms=("cuda",))
  kernels = set(re.findall(r"(expert_[a-z_]+)_mosaic_gpu", lowered.as_text()))
  assert kernels >= {"expert_matmul_swiglu", "expert_matmul_products", "expert_matmul_t_swiglu_grad",
                     "expert_matmul_t_terms_products", "expert_weight_grad"}, kernels


def test_weight_grad_steps_skip_the_experts_not_named():
  """The weight-gradient kernel runs each expert's tiles for rows / tile_k steps (none for an expert with no rows:
  an exact zero), and skips an expert whose gradient is not needed (Pallas' interpreter cannot run that kernel
  here: the Hopper test below runs it)."""
  from esft_jax.model.kernels import tiled

  sizes = jnp.asarray([128, 0, 256, 128], jnp.int32)
  np.testing.assert_array_equal(tiled.weight_grad_steps(sizes, 64, None), [2, 0, 4, 2])
  np.testing.assert_array_equal(tiled.weight_grad_steps(sizes, 64, (0, 1, 3)), [2, 0, -1, 2])  # -1: skipped
  np.testing.assert_array_equal(tiled.weight_grad_steps(sizes, 64, ()), [-1, -1, -1, -1])
  # One device's experts 4-7 (a traced first expert), named by global id.
  steps = jax.jit(tiled.weight_grad_steps, static_argnums=(1, 2))(sizes, 64, (1, 4, 5, 7, 9), jnp.int32(4))
  np.testing.assert_array_equal(steps, [2, 0, -1, 2])


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the choice made on CPUs")
def test_auto_on_cpu_is_dense_until_the_intermediate_is_large(monkeypatch):
  from esft_jax.model import experts as experts_module

  x, ids, weights, experts = moe_inputs(np.random.default_rng(2), 20, 2, 4, 16, 8, skewed=False)
  np.testing.assert_array_equal(
    expert_ffn(x, ids, weights, experts, "auto"), expert_ffn(x, ids, weights, experts, "reference")
  )
  monkeypatch.setattr(experts_module, "_CPU_DENSE_LIMIT", 4 * 20 * 8 - 1)
  np.testing.assert_array_equal(
    expert_ffn(x, ids, weights, experts, "auto"), expert_ffn(x, ids, weights, experts, "grouped")
  )


@needs_hopper
@pytest.mark.parametrize("kernel", ["tiled", "ragged"])
@pytest.mark.parametrize("k, n", [(256, 384), (384, 256)])
def test_grouped_matmul_and_gradients_match_ragged_dot(kernel, k, n):
  """Odd row count, an empty group and a one-row group; output, input and weight gradients."""
  from esft_jax.model.kernels.ffn import kernel_ops

  rng = np.random.default_rng(3)
  experts, tokens = 6, 333
  ids = jnp.asarray(np.concatenate([rng.choice([0, 2, 3, 5], tokens - 1), [1]]).reshape(-1, 1).astype(np.int32))
  matmul, _, align = kernel_ops(kernel)
  layout = expert_layout(ids, experts, align)
  real_P = jnp.asarray(layout.source_P < tokens)[:, None]
  lhs = jnp.where(real_P, jnp.asarray(rng.standard_normal((len(layout.source_P), k)), jnp.bfloat16), 0)
  rhs = jnp.asarray(rng.standard_normal((experts, k, n)) / np.sqrt(k), jnp.bfloat16)
  dout = jnp.where(real_P, jnp.asarray(rng.standard_normal((len(layout.source_P), n)), jnp.bfloat16), 0)
  sizes = layout.group_sizes_G

  out, vjp = jax.vjp(lambda a, b: matmul(a, b, sizes), lhs, rhs)
  dlhs, drhs = vjp(dout)
  f32 = lambda a: a.astype(jnp.float32)
  want, want_vjp = jax.vjp(lambda a, b: jax.lax.ragged_dot(a, b, sizes), f32(lhs), f32(rhs))
  want_dlhs, want_drhs = want_vjp(f32(dout))
  used = int(jnp.sum(sizes))
  assert rel_err(out[:used], want[:used]) < 1e-2
  assert rel_err(dlhs[:used], want_dlhs[:used]) < 1e-2
  assert rel_err(drhs, want_drhs) < 1e-2
  assert np.all(np.asarray(drhs[4]) == 0)  # expert 4 got no rows: an exact zero


@needs_hopper
@pytest.mark.parametrize("cfg", FORWARD_TILES, ids=str)
def test_forward_tiles_match_ragged_dot_on_gpu(cfg):
  """Each of FORWARD_TILES on the GPU: the product, the input gradient's (rhs read transposed), and the sum of two
  such terms with K of 384 and 128; an empty group, half tiles, and rows past the last group."""
  from esft_jax.model.kernels import tiled

  rng = np.random.default_rng(7)
  sizes = jnp.asarray([256, 0, 192, 320], jnp.int32)  # half tiles last in the 3rd group and in the last
  lhs_PxK = jnp.asarray(rng.standard_normal((896, 384)), jnp.bfloat16)
  rhs_GxKxN = jnp.asarray(rng.standard_normal((4, 384, 256)) / 20, jnp.bfloat16)
  lhs2_PxK = jnp.asarray(rng.standard_normal((896, 128)), jnp.bfloat16)
  rhs2_GxNxK = jnp.asarray(rng.standard_normal((4, 256, 128)) / 20, jnp.bfloat16)
  used = int(jnp.sum(sizes))
  want = jax.lax.ragged_dot(lhs_PxK, rhs_GxKxN, sizes, preferred_element_type=jnp.float32)
  want2 = jax.lax.ragged_dot(lhs2_PxK, jnp.swapaxes(rhs2_GxNxK, 1, 2), sizes, preferred_element_type=jnp.float32)
  out = tiled.grouped_forward(lhs_PxK, rhs_GxKxN, sizes, transpose_rhs=False, cfg=cfg)
  transposed = tiled.grouped_forward(lhs_PxK, jnp.swapaxes(rhs_GxKxN, 1, 2), sizes, transpose_rhs=True, cfg=cfg)
  summed = tiled.grouped_forward((lhs_PxK, lhs2_PxK), (jnp.swapaxes(rhs_GxKxN, 1, 2), rhs2_GxNxK), sizes,
                                 transpose_rhs=True, cfg=cfg)
  assert rel_err(out[:used], want[:used]) < 1e-2
  assert rel_err(transposed[:used], want[:used]) < 1e-2
  assert rel_err(summed[:used], want[:used] + want2[:used]) < 1e-2


@needs_hopper
@pytest.mark.parametrize("cfg", [TileConfig(64, 256, "m", store_n=64), TileConfig(64, 256, "m", store_n=32),
                                 TileConfig(128, 128, "n", store_n=32), TileConfig(128, 128, "n", store_n=16),
                                 TileConfig(64, 256, "pingpong", store_n=64)], ids=str)
def test_forward_tiles_past_the_output_width_on_gpu(cfg):
  """Blocks 256 wide on an output 384 wide: the last column tile runs past it (zero-filled loads, dropped stores),
  for the product, the input gradient's (rhs read transposed) and the epilogue with side arrays."""
  from esft_jax.model.kernels import tiled

  rng = np.random.default_rng(8)
  sizes = jnp.asarray([64, 0, 384, 192], jnp.int32)  # a half tile first and last
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  used = int(jnp.sum(sizes))
  lhs_PxK, rhs_GxKxN = normal(768, 256), normal(4, 256, 384) / 16
  sides = tuple(normal(768, 384) for _ in range(2))
  want = jax.lax.ragged_dot(lhs_PxK, rhs_GxKxN, sizes, preferred_element_type=jnp.float32)
  forward = functools.partial(tiled.grouped_forward, lhs_PxK, group_sizes_G=sizes, cfg=cfg)
  out = forward(rhs_GxKxN, transpose_rhs=False)
  transposed = forward(jnp.swapaxes(rhs_GxKxN, 1, 2), transpose_rhs=True)
  dgate, dup = forward(jnp.swapaxes(rhs_GxKxN, 1, 2), transpose_rhs=True, epilogue="swiglu_grad", sides=sides)
  wants = (want, want, want * sides[0].astype(jnp.float32), want * sides[1].astype(jnp.float32))
  for got, expected in zip((out, transposed, dgate, dup), wants, strict=True):
    assert rel_err(got[:used], expected[:used]) < 1e-2


@needs_hopper
@pytest.mark.parametrize("cfg", [WEIGHT_GRAD_TILES, TileConfig(64, 256, "m", grid_tile_width=1),
                                 TileConfig(128, 128, "n", grid_tile_width=1),
                                 TileConfig(128, 128, "pingpong", grid_tile_width=1),
                                 TileConfig(64, 256, "pingpong", grid_tile_width=1, store_n=64)], ids=str)
def test_weight_grad_tiles_match_ragged_dot_on_gpu(cfg):
  """Each weight-gradient tiling on the GPU against lhs[rows of e].T @ dout[rows of e], on a width of 384 (256-wide
  blocks run past it): an expert with no rows gets an exact zero; one not named is skipped."""
  from esft_jax.model.kernels import tiled

  rng = np.random.default_rng(9)
  sizes = jnp.asarray([256, 0, 192, 384, 64], jnp.int32)  # multiples of ALIGN (64), not all of 128
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  lhs_PxK, dout_PxN = normal(896, 256), normal(896, 384)
  grads = tiled.grouped_weight_grad(lhs_PxK, dout_PxN, sizes, cfg=cfg, groups=(0, 1, 3, 4))
  starts = np.concatenate([[0], np.cumsum(sizes)])
  for e in (0, 1, 3, 4):
    rows = slice(starts[e], starts[e + 1])
    want = lhs_PxK[rows].astype(jnp.float32).T @ dout_PxN[rows].astype(jnp.float32)
    if e == 1:
      assert np.all(np.asarray(grads[e]) == 0)
    else:
      assert rel_err(grads[e], want) < 1e-2


@needs_hopper
@pytest.mark.parametrize("kernel", ["tiled", "ragged"])
@pytest.mark.parametrize("skewed", [False, True], ids=["even", "skewed"])
def test_gpu_expert_ffn_matches_reference(kernel, skewed):
  from esft_jax.model.kernels.ffn import gpu_expert_ffn

  rng = np.random.default_rng(4)
  x, ids, weights, experts = moe_inputs(rng, 300, 4, 16, 256, 384, skewed)
  cotangent = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

  def loss(fn):
    return lambda x_, w_, e_: jnp.sum(fn(x_, ids, w_, e_).astype(jnp.float32) * cotangent)

  reference = lambda *a: expert_ffn(*a, impl="reference")
  gpu = jax.jit(lambda *a: gpu_expert_ffn(*a, kernel=kernel))
  assert rel_err(gpu(x, ids, weights, experts), reference(x, ids, weights, experts)) < 2e-2
  grads = jax.jit(jax.grad(loss(gpu), argnums=(0, 1, 2)))(x, weights, experts)
  want = jax.grad(loss(reference), argnums=(0, 1, 2))(x, weights, experts)
  for got_leaf, want_leaf in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
    assert rel_err(got_leaf, want_leaf) < 2e-2
  unused = np.setdiff1d(np.arange(16), np.asarray(ids))
  assert len(unused) == (2 if skewed else 0)
  for name in experts:
    assert np.all(np.asarray(grads[2][name][unused]) == 0)


@needs_hopper
def test_gpu_expert_ffn_weight_grads_only_for_trained_experts():
  """ESFT's backward on the kernels: input and gate-weight gradients as the reference's, the trained experts' weight
  gradients too (an exact zero for trained expert 6, which gets no token); the frozen experts' are not computed."""
  from esft_jax.model.kernels.ffn import gpu_expert_ffn

  rng = np.random.default_rng(7)
  x, ids, weights, experts = moe_inputs(rng, 300, 4, 16, 256, 384, skewed=False)
  ids = jnp.asarray(routing(rng, 300, 4, 15, skewed=False))
  ids = jnp.where(ids >= 6, ids + 1, ids)  # 16 experts, and none of the tokens chooses expert 6
  cotangent = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  trained = (1, 5, 6)

  def loss(fn):
    return lambda x_, w_, e_: jnp.sum(fn(x_, ids, w_, e_).astype(jnp.float32) * cotangent)

  esft = jax.jit(lambda *a: gpu_expert_ffn(*a, trained_experts=trained))
  grads = jax.jit(jax.grad(loss(esft), argnums=(0, 1, 2)))(x, weights, experts)
  want = jax.grad(loss(lambda *a: expert_ffn(*a, impl="reference")), argnums=(0, 1, 2))(x, weights, experts)
  assert rel_err(grads[0], want[0]) < 2e-2 and rel_err(grads[1], want[1]) < 2e-2
  for name in experts:
    assert rel_err(grads[2][name][trained,], want[2][name][trained,]) < 2e-2
    assert np.all(np.asarray(grads[2][name][6]) == 0)


@needs_hopper
@pytest.mark.parametrize("kernel", ["tiled", "ragged"])
def test_gpu_expert_ffn_on_one_devices_experts(kernel):
  """Expert parallelism on one GPU: experts 8-15 of 16 (first_expert traced) with the other experts'
  assignments skipped, against the reference on the same slice; the weight gradients of ESFT's trained experts
  (global ids, one of them elsewhere) as the reference's."""
  from esft_jax.model.kernels.ffn import gpu_expert_ffn

  rng = np.random.default_rng(9)
  x, ids, weights, experts = moe_inputs(rng, 300, 4, 16, 256, 384, skewed=False)
  local_ids = jnp.where(ids >= 8, ids - 8, 8)  # 8: an expert elsewhere
  half = {name: v[8:] for name, v in experts.items()}
  cotangent = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  trained = (1, 9, 14)

  def esft(x_, w_, e_, first):
    out = gpu_expert_ffn(x_, local_ids, w_, e_, kernel=kernel, trained_experts=trained, first_expert=first)
    return jnp.sum(out.astype(jnp.float32) * cotangent)

  def reference(x_, w_, e_):
    return jnp.sum(expert_ffn(x_, ids, w_, e_, impl="reference", first_expert=8).astype(jnp.float32) * cotangent)

  value, grads = jax.jit(jax.value_and_grad(esft, argnums=(0, 1, 2)))(x, weights, half, jnp.int32(8))
  want_value, want = jax.value_and_grad(reference, argnums=(0, 1, 2))(x, weights, half)
  assert abs(float(value) - float(want_value)) < 2e-2 * abs(float(want_value))
  assert rel_err(grads[0], want[0]) < 2e-2 and rel_err(grads[1], want[1]) < 2e-2
  for name in half:
    got, wanted = np.asarray(grads[2][name], np.float32), np.asarray(want[2][name], np.float32)
    assert rel_err(got[[1, 6]], wanted[[1, 6]]) < 2e-2
    if kernel == "ragged":  # computes every expert's; "tiled" leaves the frozen ones' unwritten
      assert rel_err(got, wanted) < 2e-2


@needs_hopper
def test_auto_is_gpu_on_hopper():
  from esft_jax.model.kernels.ffn import gpu_expert_ffn

  x, ids, weights, experts = moe_inputs(np.random.default_rng(5), 64, 2, 8, 128, 128, skewed=False)
  np.testing.assert_array_equal(
    expert_ffn(x, ids, weights, experts, "auto"), gpu_expert_ffn(x, ids, weights, experts)
  )


def test_bench_moe_tiny_prints_a_table(tmp_path):
  """The tiny run's table; with --profile each JAX case is traced (a CPU trace has no device kernels to list)."""
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  proc = subprocess.run(
    [sys.executable, str(REPO / "experiments" / "bench_moe.py"), "--tiny", "--profile", str(tmp_path)],
    capture_output=True, text=True, timeout=300, env=env, check=True,
  )
  lines = proc.stdout.splitlines()
  header = lines.index("| op | pass | rows | routing | path | ms | TFLOP/s | waited ms | peak GiB | vs torch |")
  body = [line for line in lines[header + 2:] if line.startswith("| ")]
  assert {line.split(" | ")[4] for line in body} >= {"grouped"}
  assert len(body) >= 8
  assert "# grouped swiglu fwd+bwd 96 even: no kernels on a device stream line" in proc.stdout
  assert list(tmp_path.glob("grouped_swiglu_fwd+bwd_96_even/**/perfetto_trace.json.gz"))
