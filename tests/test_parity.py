"""Parity against transformers itself: logits, routing (ids and weights), LM loss and balance loss."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from esft_jax.interop.hf import load_hf_model
from esft_jax.model.transformer import Transformer
from esft_jax.train.loss import masked_mean_loss
from tests.hf_models import ARCHITECTURES, VOCAB, capture_routing, save_hf_model_dir


def _batch(lengths, total, seed):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, VOCAB, size=(len(lengths), total))
  mask = np.zeros_like(tokens)
  for i, n in enumerate(lengths):
    mask[i, :n] = 1
  return tokens * mask, mask  # right padding with token 0


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@pytest.mark.parametrize("lengths,total", [((7,), 7), ((16, 11, 5), 16)])
def test_forward_matches_transformers(tmp_path, name, lengths, total):
  hf_model = save_hf_model_dir(name, tmp_path)
  loaded = load_hf_model(tmp_path)
  tokens, mask = _batch(lengths, total, seed=len(lengths))

  records, handles = capture_routing(hf_model)
  labels = torch.tensor(np.where(mask == 1, tokens, -100))
  with torch.no_grad():
    hf_out = hf_model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask), labels=labels)
  for h in handles:
    h.remove()

  out = Transformer(loaded.config, expert_impl="grouped").apply(
      {"params": loaded.params}, jnp.asarray(tokens), segment_ids_BxL=jnp.asarray(mask))
  valid = mask.astype(bool)
  hf_logits = hf_out.logits.numpy()
  np.testing.assert_allclose(np.asarray(out.logits)[valid], hf_logits[valid], atol=1e-4, rtol=0)

  assert len(records) == len(out.routing) == len(loaded.config.moe_layer_ids)
  for (hf_weights, hf_ids), routing in zip(records, out.routing):
    hf_ids = hf_ids.numpy().reshape(tokens.shape + (-1,))[valid]
    hf_weights = hf_weights.float().numpy().reshape(tokens.shape + (-1,))[valid]
    ids, weights = np.asarray(routing.expert_ids)[valid], np.asarray(routing.weights)[valid]
    order_hf, order = np.argsort(hf_ids, axis=-1), np.argsort(ids, axis=-1)
    np.testing.assert_array_equal(np.take_along_axis(ids, order, -1), np.take_along_axis(hf_ids, order_hf, -1))
    np.testing.assert_allclose(np.take_along_axis(weights, order, -1),
                               np.take_along_axis(hf_weights, order_hf, -1), atol=1e-5, rtol=0)

  loss = masked_mean_loss(out.logits[:, :-1], jnp.asarray(tokens[:, 1:]), jnp.asarray(mask[:, 1:]))
  hf_lm_loss = hf_out.loss.item()
  cfg = loaded.config
  if cfg.aux_loss_kind == "global":
    # transformers adds coef * balance loss to the LM loss; compare both parts.
    np.testing.assert_allclose(float(out.aux_loss) / cfg.aux_loss_coef, hf_out.aux_loss.item(), rtol=1e-5)
    hf_lm_loss -= cfg.aux_loss_coef * hf_out.aux_loss.item()
  np.testing.assert_allclose(float(loss), hf_lm_loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["deepseek_v2", "mixtral"])
def test_reference_and_grouped_experts_agree(tmp_path, name):
  save_hf_model_dir(name, tmp_path)
  loaded = load_hf_model(tmp_path)
  tokens, mask = _batch((12, 9), 12, seed=3)
  outs = [Transformer(loaded.config, expert_impl=impl).apply({"params": loaded.params}, jnp.asarray(tokens),
                                                              segment_ids_BxL=jnp.asarray(mask))
          for impl in ("reference", "grouped")]
  np.testing.assert_allclose(np.asarray(outs[0].logits), np.asarray(outs[1].logits), atol=1e-5)
