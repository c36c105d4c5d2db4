"""Compile-only memory probe of the ESFT step at DeepSeek-V2-Lite widths. argv: name layers batch seq accum remat variant"""
import json, os, sys, time
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "experiments"))
import jax, jax.numpy as jnp
from esft_jax.config import config_from_hf, read_hf_config
from esft_jax.esft.trainable import plan_from_expert_config
from esft_jax.model import experts as ex
from esft_jax.sharding import single_device_mesh
from esft_jax.train.trainer import TrainConfig
from esft_jax.train import memory_plan as mp

name, layers, batch, seq, accum, remat, variant = sys.argv[1], *map(int, sys.argv[2:6]), sys.argv[6] == "1", sys.argv[7]
if variant == "base":  # the rows' gradient without the optimization barrier
  def bwd(ids_S, grad_ExDxF):
    experts = grad_ExDxF.shape[0]
    held_S = (ids_S >= 0) & (ids_S < experts)
    rows = grad_ExDxF[jnp.clip(ids_S, 0, experts - 1)]
    return None, jnp.where(held_S[:, None, None], rows, 0).astype(grad_ExDxF.dtype), None
  ex.rows_already_in.defvjp(ex._rows_already_in_fwd, bwd)
config = config_from_hf(dict(read_hf_config("deepseek-v2-lite"), num_hidden_layers=layers))
plan = plan_from_expert_config({"experts": {str(l): list(range(8)) for l in config.moe_layer_ids}})
cfg = TrainConfig(grad_accum=accum, remat=remat, max_segments=1)
start = time.time()
m = mp.plan_train_step(config, plan, cfg, single_device_mesh(), batch, seq)
print(f"== {name}: {layers} layers, {accum} x {batch} x {seq}, remat {remat}, variant {variant}, compiled in {time.time()-start:.0f} s")
print(mp.format_plan(m), flush=True)
