"""Expert relevance scores (ESFT paper eqs. 6-7): per MoE layer and routed expert, the token selection ratio
and the average gate value over the scored tokens.

Two sources give the same totals: `accumulate`, inside a jitted scoring step over our own model's routing,
and `read_routing_logs`, which imports the official scorer's `expert_weights_{layer}.txt` files. Both feed
`summary_from_totals`, which writes ESFT's `summary.json` schema.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from esft_jax.files import atomic_write_text
from esft_jax.model.moe import Routing

LOG_NAME = re.compile(r"expert_weights_(\d+)\.txt")


class RoutingTotals(NamedTuple):
  """Routing statistics summed over scored tokens; a pytree, so it can be carried through `jax.jit`.

  `zeros` gives float32 device arrays for the scoring loop (exact counts up to 2**24 tokens per expert);
  `read_routing_logs` gives float64 numpy arrays so that the official 4-decimal summary is reproduced exactly.
  """
  token_counts: Any  # [n_moe_layers, E]: tokens whose top-K contains the expert
  gate_sums: Any  # [n_moe_layers, E]: sum of the gate weights those tokens applied to the expert
  n_tokens: Any  # scalar: scored (non-padding) tokens, T

  @classmethod
  def zeros(cls, n_layers: int, num_experts: int) -> RoutingTotals:
    return cls(jnp.zeros((n_layers, num_experts), jnp.float32), jnp.zeros((n_layers, num_experts), jnp.float32),
               jnp.zeros((), jnp.int32))


def accumulate(totals: RoutingTotals, routing: Sequence[Routing], token_mask_BxL: jax.Array) -> RoutingTotals:
  """Adds one batch's routing (one `Routing` per MoE layer, in `totals` row order) to `totals`.

  `token_mask_BxL` is nonzero on real tokens (segment ids work as is); padded positions are routed too, so
  they must be masked out here rather than trusted to be harmless."""
  n_layers, num_experts = totals.token_counts.shape
  if len(routing) != n_layers:
    raise ValueError(f"routing has {len(routing)} MoE layers but the totals have {n_layers} rows; "
                     "pass one Routing per MoE layer in config.moe_layer_ids order")
  chex.assert_rank(token_mask_BxL, 2)
  for layer, r in enumerate(routing):  # the mask is broadcast over K below: it must be [B, L] of this routing
    chex.assert_shape(r.expert_ids, (*token_mask_BxL.shape, None), custom_message=f"routing of MoE layer {layer}")
    chex.assert_equal_shape([r.expert_ids, r.weights], custom_message=f"routing of MoE layer {layer}")
  real_BxL = token_mask_BxL != 0
  mask_BxLx1 = real_BxL[..., None].astype(jnp.float32)
  counts, gates = [], []
  for r in routing:
    flat_ids = r.expert_ids.reshape(-1)
    empty_E = jnp.zeros(num_experts, jnp.float32)
    counts.append(empty_E.at[flat_ids].add(jnp.broadcast_to(mask_BxLx1, r.expert_ids.shape).reshape(-1)))
    gates.append(empty_E.at[flat_ids].add((r.weights.astype(jnp.float32) * mask_BxLx1).reshape(-1)))
  n_new = jnp.sum(real_BxL, dtype=jnp.asarray(totals.n_tokens).dtype)
  return RoutingTotals(totals.token_counts + jnp.stack(counts), totals.gate_sums + jnp.stack(gates),
                       totals.n_tokens + n_new)


def summary_from_totals(totals: RoutingTotals, top_k: int, layer_ids: Sequence[int]) -> dict[str, dict]:
  """ESFT's summary.json: token score = count / (K T) (sums to 1 per layer), gate score = gate sum / T (sums to
  the mean top-K mass; not renormalised, as the released configs were selected from it). Rounded to 4 decimals
  like the official file, because selection runs on the rounded values."""
  counts_NxE = np.asarray(totals.token_counts, np.float64)
  gates_NxE = np.asarray(totals.gate_sums, np.float64)
  n_tokens = float(np.asarray(totals.n_tokens))
  if len(layer_ids) != counts_NxE.shape[0]:
    raise ValueError(f"{len(layer_ids)} layer ids for {counts_NxE.shape[0]} rows of routing totals")
  if n_tokens <= 0:
    raise ValueError("no tokens were scored (n_tokens is 0); score at least one non-padding token")
  token_NxE = counts_NxE / (top_k * n_tokens)
  gate_NxE = gates_NxE / n_tokens

  def table(scores_NxE):
    return {str(layer): {str(e): round(float(s), 4) for e, s in enumerate(row)}
            for layer, row in zip(layer_ids, scores_NxE)}

  return {"token_scores": table(token_NxE), "gate_scores": table(gate_NxE)}


def write_summary(path: str | Path, summary: dict[str, dict]):
  """Writes summary.json atomically, byte-compatible with the official file (layer keys in string order)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  text = json.dumps({name: dict(sorted(layers.items())) for name, layers in summary.items()})
  atomic_write_text(path, text)


def read_routing_logs(directory: str | Path, top_k: int | None = None,
                      num_experts: int | None = None) -> tuple[RoutingTotals, list[int], int]:
  """Imports the official scorer's logs: `expert_weights_{layer}.txt` in `directory` and in its `rank_*`
  subfolders (one per scoring process). Each line is one forward call: every token's top-K ids, a tab pair,
  then the matching weights. Returns (float64 totals, sorted layer ids, K).

  The logs do not record K: without `top_k` it is the largest K dividing every line for which each token's K
  ids are distinct. Real logs pin it down (neighbouring tokens share experts); pass it for tiny synthetic ones.
  `num_experts` defaults to the largest logged id + 1."""
  directory = Path(directory)
  files: dict[int, list[Path]] = {}
  for file in sorted(directory.glob("expert_weights_*.txt")) + sorted(directory.glob("rank_*/expert_weights_*.txt")):
    match = LOG_NAME.fullmatch(file.name)
    if not match:
      raise ValueError(f"{file}: routing log names must be expert_weights_<decoder layer>.txt")
    files.setdefault(int(match.group(1)), []).append(file)
  if not files:
    raise FileNotFoundError(f"{directory}: no expert_weights_*.txt routing logs here or in rank_*/ subfolders; "
                            "pass the folder the scorer wrote")
  layer_ids = sorted(files)
  lines = {layer: [line for file in files[layer] for line in _parse_log(file)] for layer in layer_ids}
  all_lines = [line for layer in layer_ids for line in lines[layer]]
  if top_k is None:
    top_k = _infer_top_k([ids for _, _, ids, _ in all_lines])
  for file, lineno, ids, _ in all_lines:
    if len(ids) % top_k:
      raise ValueError(f"{file}:{lineno}: {len(ids)} expert ids is not a multiple of top_k={top_k}")
  max_id = max(int(ids.max()) for _, _, ids, _ in all_lines)
  if num_experts is None:
    num_experts = max_id + 1
  elif max_id >= num_experts:
    file, lineno = next((f, n) for f, n, ids, _ in all_lines if ids.max() == max_id)
    raise ValueError(f"{file}:{lineno}: expert id {max_id} is out of range for num_experts={num_experts}")

  counts_NxE = np.zeros((len(layer_ids), num_experts))
  gates_NxE = np.zeros((len(layer_ids), num_experts))
  n_ids = {}
  for row, layer in enumerate(layer_ids):
    # One bincount over the concatenated lines adds in file order, as the official loop does; the rounded
    # summary then matches bit for bit.
    ids = np.concatenate([ids for _, _, ids, _ in lines[layer]])
    weights = np.concatenate([w for _, _, _, w in lines[layer]])
    counts_NxE[row] = np.bincount(ids, minlength=num_experts)
    gates_NxE[row] = np.bincount(ids, weights=weights, minlength=num_experts)
    n_ids[layer] = ids.size
  if len(set(n_ids.values())) > 1:
    raise ValueError(f"{directory}: the layers logged different numbers of tokens ({_token_counts(n_ids, top_k)}); "
                     "the logs are truncated or mix runs, so score again into an empty folder")
  n_tokens = n_ids[layer_ids[0]] // top_k
  return RoutingTotals(counts_NxE, gates_NxE, n_tokens), layer_ids, top_k


def summary_from_logs(directory: str | Path, top_k: int | None = None,
                      num_experts: int | None = None) -> dict[str, dict]:
  """summary.json from the official scorer's routing logs (see `read_routing_logs`)."""
  totals, layer_ids, top_k = read_routing_logs(directory, top_k, num_experts)
  return summary_from_totals(totals, top_k, layer_ids)


def write_routing_logs(directory: str | Path, layer_ids: Sequence[int],
                       samples: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]]):
  """Writes routing in the official log format, one line per sample and weights at 4 decimals.

  `samples[s][j]` is (ids [L_s, K], weights [L_s, K]) of sample s at MoE layer `layer_ids[j]`, padding removed.
  Existing logs of these layers are replaced (the official hook appends, so its re-runs accumulate)."""
  directory = Path(directory)
  lines: dict[int, list[str]] = {layer: [] for layer in layer_ids}
  for s, per_layer in enumerate(samples):
    if len(per_layer) != len(layer_ids):
      raise ValueError(f"sample {s} has routing for {len(per_layer)} layers, expected {len(layer_ids)} "
                       f"(layer_ids {list(layer_ids)})")
    for layer, (ids, weights) in zip(layer_ids, per_layer):
      ids_LxK, weights_LxK = np.asarray(ids), np.asarray(weights)
      if ids_LxK.ndim != 2 or ids_LxK.shape != weights_LxK.shape or ids_LxK.size == 0:
        raise ValueError(f"sample {s}, layer {layer}: ids {ids_LxK.shape} and weights {weights_LxK.shape} must be "
                         "equal, non-empty [L, K] arrays")
      id_text = "\t".join(str(int(i)) for i in ids_LxK.reshape(-1))
      weight_text = "\t".join(str(round(float(w), 4)) for w in weights_LxK.reshape(-1))
      lines[layer].append(f"{id_text}\t\t{weight_text}\n")
  directory.mkdir(parents=True, exist_ok=True)
  for layer, layer_lines in lines.items():
    atomic_write_text(directory / f"expert_weights_{layer}.txt", "".join(layer_lines))


def _parse_log(file: Path) -> list[tuple[Path, int, np.ndarray, np.ndarray]]:
  """(file, line number, ids, weights) per line, with errors that point at the line."""
  parsed = []
  with open(file) as f:
    for lineno, line in enumerate(f, start=1):
      parts = line.rstrip("\n").split("\t\t")
      if len(parts) != 2:
        raise ValueError(f"{file}:{lineno}: expected tab-separated expert ids, a tab pair, then the weights; "
                         f"found {len(parts) - 1} tab pairs")
      id_fields, weight_fields = parts[0].split("\t"), parts[1].split("\t")
      if len(id_fields) != len(weight_fields):
        raise ValueError(f"{file}:{lineno}: {len(id_fields)} expert ids but {len(weight_fields)} weights")
      ids = np.array([_number(int, v, file, lineno, "expert id") for v in id_fields], np.int64)
      weights = np.array([_number(float, v, file, lineno, "weight") for v in weight_fields], np.float64)
      if ids.min() < 0:
        raise ValueError(f"{file}:{lineno}: expert id {ids.min()} is negative")
      parsed.append((file, lineno, ids, weights))
  if not parsed:
    raise ValueError(f"{file}: empty routing log; the scorer logged no forward call for this layer")
  return parsed


def _number(kind, text: str, file: Path, lineno: int, what: str):
  try:
    value = kind(text)
  except ValueError:
    raise ValueError(f"{file}:{lineno}: {what} {text!r} is not a number") from None
  if not math.isfinite(value):
    raise ValueError(f"{file}:{lineno}: {what} {text!r} is not finite")
  return value


def _infer_top_k(ids_per_line: list[np.ndarray]) -> int:
  common = math.gcd(*(ids.size for ids in ids_per_line))
  for k in range(common, 1, -1):
    if common % k == 0 and all(_tokens_distinct(ids.reshape(-1, k)) for ids in ids_per_line):
      return k
  return 1


def _tokens_distinct(ids_TxK: np.ndarray) -> bool:
  return bool(np.all(np.diff(np.sort(ids_TxK, axis=1), axis=1) != 0))


def _token_counts(n_ids: dict[int, int], top_k: int) -> str:
  return ", ".join(f"layer {layer}: {n / top_k:g}" for layer, n in n_ids.items())
