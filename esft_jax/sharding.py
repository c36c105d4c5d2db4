"""Device meshes and the one table from logical axis names to mesh axes.

MaxText's three layers: physical mesh axes (below) -> the logical names every parameter and key activation
carries (`embed`, `mlp`, `experts`, `batch`, ...; see esft_jax/model) -> `LOGICAL_RULES`. Changing the
parallelism is choosing a mesh or editing the table, never the model. Every sharding here is resolved before
anything compiles, so a mesh that does not fit the devices or the model fails with a message, not an XLA error.

Mesh axes:
  data    plain data parallelism: the batch is split, parameters are replicated.
  fsdp    data parallelism that also splits every parameter (and its optimizer state) on one dimension,
          gathered on use (ZeRO-3 / FSDP).
  expert  expert parallelism: the stacked routed experts [E, D, F] are split by expert, and the batch too; each
          device runs its experts on its expert group's tokens (esft_jax.model.moe.routed_experts).
  tensor  tensor parallelism: MLP widths, attention heads and the vocabulary are split.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from esft_jax.config import ModelConfig
from esft_jax.esft.trainable import TrainPlan
from esft_jax.model.transformer import init_params, logical_axes
from esft_jax.param_roles import role
from esft_jax.paths import leaves_by_path, set_path

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")

# Logical name -> mesh axes, in priority order: an array dimension takes the first rule whose mesh axes no
# earlier dimension of the same array took (flax's resolution). So activations [batch, length, embed] split
# on batch over (data, fsdp, expert) and keep embed whole, while parameters, which have no batch dimension,
# split embed over fsdp. Names without a rule (length, head_dim) are never split.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("kv_lora", "fsdp"),  # MLA's kv_b_proj / q_b_proj have no embed dimension: FSDP on their rank instead
    ("q_lora", "fsdp"),
    ("experts", "expert"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
)


def parse_mesh(spec: str) -> dict[str, int]:
  """`--mesh` text -> axis sizes over MESH_AXES, e.g. "data=2,fsdp=4" -> {data: 2, fsdp: 4, expert: 1,
  tensor: 1}. Unnamed axes are 1; one axis may be -1, meaning "every device the others leave"."""
  sizes = dict.fromkeys(MESH_AXES, 1)
  seen = set()
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, _, value = part.partition("=")
    name = name.strip()
    if name not in sizes:
      raise ValueError(f"--mesh {spec!r}: unknown axis {name!r}; the axes are {', '.join(MESH_AXES)}")
    if name in seen:
      raise ValueError(f"--mesh {spec!r}: axis {name!r} is given twice")
    try:
      size = int(value)
    except ValueError:
      raise ValueError(f"--mesh {spec!r}: {part!r} needs an integer size, as in {name}=2") from None
    if size == 0 or size < -1:
      raise ValueError(f"--mesh {spec!r}: {name}={size}; sizes are positive, or -1 for the remaining devices")
    seen.add(name)
    sizes[name] = size
  if list(sizes.values()).count(-1) > 1:
    raise ValueError(f"--mesh {spec!r}: at most one axis may be -1")
  return sizes


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over `devices` (default: every device of every process) with the axes of `parse_mesh`.
  The axis sizes must multiply to the device count exactly: JAX would otherwise quietly use a subset."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = {name: int(axes.get(name, 1)) for name in MESH_AXES}
  unknown = set(axes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh axes {sorted(unknown)} are unknown; the axes are {', '.join(MESH_AXES)}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  for name, size in sizes.items():
    if size == -1:
      if len(devices) % fixed:
        raise ValueError(f"mesh {describe_sizes(sizes)}: {len(devices)} devices do not split into groups of "
                         f"{fixed} for {name}=-1; choose the other axis sizes to divide {len(devices)}")
      sizes[name] = len(devices) // fixed
  if math.prod(sizes.values()) != len(devices):
    raise ValueError(f"mesh {describe_sizes(sizes)} needs {math.prod(sizes.values())} devices, but there are "
                     f"{len(devices)}; the axis sizes must multiply to {len(devices)} (one axis may be -1 to take "
                     "the rest)")
  return jax.make_mesh(tuple(sizes.values()), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def single_device_mesh() -> Mesh:
  """The mesh of a run without --mesh: this process's first device, so one code path serves both."""
  return make_mesh({}, jax.local_devices()[:1])


def mesh_from_flags(spec: str | None, distributed: bool) -> Mesh | None:
  """The CLI's `--mesh` and `--distributed`. Joins the other processes first (JAX must not have computed
  anything yet); None, without --mesh, means one device."""
  if distributed:
    jax.distributed.initialize()  # TPU pod slices, SLURM, Open MPI and Kubernetes are detected
  if spec is None:
    if jax.process_count() > 1:
      raise ValueError(f"--distributed joined {jax.process_count()} processes; give --mesh to spread the run "
                       "over their devices (e.g. --mesh fsdp=-1)")
    return None
  return make_mesh(parse_mesh(spec))


def describe_sizes(sizes: Mapping[str, int]) -> str:
  return ",".join(f"{name}={size}" for name, size in sizes.items())


def describe(mesh: Mesh) -> str:
  return f"{describe_sizes(mesh.shape)} over {mesh.size} devices in {jax.process_count()} process(es)"


@contextlib.contextmanager
def logical_rules(mesh: Mesh) -> Iterator[None]:
  """Activates the model's activation constraints (`nn.with_logical_constraint`) on `mesh`; use inside
  the traced function, so the jitted step carries its own mesh and rules. The routed experts do not read it: they
  split their work by the mesh the model is built with (`Transformer(mesh=...)`)."""
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(LOGICAL_RULES):
    yield


def mesh_axes(logical: PartitionSpec) -> PartitionSpec:
  """Logical names -> mesh axes through LOGICAL_RULES."""
  return nn.logical_to_mesh_axes(tuple(logical), LOGICAL_RULES)


def _axis_size(mesh: Mesh, axes: str | tuple[str, ...] | None) -> int:
  if axes is None:
    return 1
  return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def check_divisible(what: str, shape: Sequence[int], logical: PartitionSpec, mesh: Mesh) -> PartitionSpec:
  """The mesh spec of one array, after checking that every split dimension divides by its mesh axes."""
  spec = mesh_axes(logical)
  for dim, (size, name, axes) in enumerate(zip(shape, logical, spec)):
    parts = _axis_size(mesh, axes)
    if size % parts:
      axes_text = axes if isinstance(axes, str) else " x ".join(axes)
      raise ValueError(f"{what}: dimension {dim} ({name}, size {size}) is split over mesh axis {axes_text} "
                       f"of size {parts}, which does not divide it; choose a --mesh whose {axes_text} size "
                       f"divides {size} (mesh now {describe_sizes(mesh.shape)})")
  return spec


def _named(mesh: Mesh, shapes: dict[str, Any], logical: dict[str, PartitionSpec], kind: str) -> dict:
  tree: dict = {}
  for path, leaf in shapes.items():
    set_path(tree, path, NamedSharding(mesh, check_divisible(f"{kind} {path}", leaf.shape, logical[path], mesh)))
  return tree


def param_shardings(config: ModelConfig, mesh: Mesh) -> dict:
  """NamedShardings of the model parameters (the frozen tree), from their logical names."""
  shapes = leaves_by_path(jax.eval_shape(lambda: init_params(config, jax.random.key(0))))
  return _named(mesh, shapes, leaves_by_path(logical_axes(config)), "parameter")


def trainable_shardings(plan: TrainPlan, config: ModelConfig, mesh: Mesh, trainable_like) -> dict:
  """NamedShardings of the trainable tree. Whole leaves shard like their parameter. An ESFT expert slice
  [n_selected, D, F] shards on its width only: n_selected is small, differs per layer and rarely divides
  the expert axis, while D and F are the dimensions that make it large. LoRA factors shard their leading
  (expert) and outer dimensions like the kernel they adapt, never the rank."""
  frozen = leaves_by_path(logical_axes(config))
  logical = {}
  for path in leaves_by_path(trainable_like):
    kernel, _, factor = path.rpartition("/")
    if plan.method == "lora":
      *lead, fan_in, fan_out = frozen[kernel]
      names = (*lead, fan_in, None) if factor == "lora_a" else (*lead, None, fan_out)
    elif role(path).kind == "routed_experts" and not plan.trains_whole(path):
      names = (None, *frozen[path][1:])
    else:
      names = tuple(frozen[path])
    logical[path] = PartitionSpec(*names)
  return _named(mesh, leaves_by_path(trainable_like), logical, "trainable")


def opt_state_shardings(opt_state_like, trainable_like, trainable_shardings_tree, mesh: Mesh):
  """Optimizer state sharded like its parameters: a leaf whose path ends in a trainable path (Adam's mu and
  nu under their parameter's keys) with that parameter's shape takes its sharding; counters are replicated."""
  shapes = {path: leaf.shape for path, leaf in leaves_by_path(trainable_like).items()}
  by_path = leaves_by_path(trainable_shardings_tree)

  def pick(keypath, leaf):
    keys: list[str] = []
    for key in reversed(keypath):
      if not isinstance(key, jax.tree_util.DictKey):
        break
      keys.insert(0, str(key.key))
    path = "/".join(keys)
    return by_path[path] if shapes.get(path) == leaf.shape else replicated(mesh)

  return jax.tree_util.tree_map_with_path(pick, opt_state_like)


def batch_parallelism(mesh: Mesh) -> int:
  """How many parts a batch splits into: the product of the batch axes."""
  return _axis_size(mesh, BATCH_AXES)


def batch_sharding(mesh: Mesh, leading: int = 0) -> NamedSharding:
  """Batches [..., B, L] split on B over the batch axes; `leading` dimensions (micro-batches) stay whole."""
  return NamedSharding(mesh, PartitionSpec(*([None] * leading), BATCH_AXES))


def check_batch_size(global_batch: int, mesh: Mesh, option: str = "--batch-size") -> None:
  """Every batch must split evenly over the batch axes, and over processes (each reads its own rows)."""
  parts = batch_parallelism(mesh)
  if global_batch % parts:
    raise ValueError(f"{option} {global_batch} does not split over the mesh's batch axes ({' x '.join(BATCH_AXES)} "
                     f"= {parts}, mesh {describe_sizes(mesh.shape)}); use a multiple of {parts}")
  if parts % jax.process_count():
    raise ValueError(f"mesh {describe_sizes(mesh.shape)} splits the batch {parts} ways, which {jax.process_count()} "
                     "processes cannot share (each reads its own rows); make data x fsdp x expert a multiple of "
                     "the process count")


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def place(tree, shardings):
  """Puts arrays onto their shardings (a tree like `tree`, or one for every leaf); arrays already there are
  kept. "There" means the same sharding object, not an equivalent one: jit keys its compiled programs on the
  sharding's type, so a single-device array fed where the step returns a NamedSharding would compile twice.
  Where a sharding spans other processes, each process supplies only its own shards of the full
  values it holds (a loaded model, a scoring batch: the same on every process)."""

  def put(x, sharding: NamedSharding):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    if sharding.is_fully_addressable:
      return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  if isinstance(shardings, NamedSharding):
    shardings = jax.tree_util.tree_map(lambda _: shardings, tree)
  return jax.tree_util.tree_map(put, tree, shardings)


def global_batch(local: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """One global batch from each process's own rows (the data pipeline gives process i its shard)."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def to_host(tree):
  """A sharded tree as numpy arrays on every process (for writing adapters from process 0)."""
  return multihost_utils.process_allgather(tree, tiled=True)
