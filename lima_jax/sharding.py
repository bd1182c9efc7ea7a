"""The device mesh and the one table that maps logical axis names onto it.

Params and activations are named logically ('embed', 'heads', 'batch', ...); this module alone
decides which mesh axis each name is split over. Changing the parallelism layout means editing
LOGICAL_RULES, nothing else.
"""

import dataclasses
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from lima_jax.errors import LimaError

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes. Weights are split along 'embed' over fsdp (ZeRO-3 style: gathered
# just in time by XLA) and along heads / mlp / vocab over tensor; activations keep 'act_embed'
# whole and split the batch over every data-parallel axis.
LOGICAL_RULES = {
    "batch": ("data", "fsdp"),
    "length": None,
    "act_embed": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "layers": None,
    "lora_rank": None,  # LoRA's rank dimension (lima_jax.lora): small, kept whole
    # A LoRA adapter's flattened heads x head_dim or FFN axis: split over every weight-sharding
    # axis, so adapters shard like the base does (ZeRO-3 style, gathered just in time).
    "lora_features": ("fsdp", "tensor"),
}

# The config key a user changes when a logical dimension does not divide its mesh axis.
_CONFIG_KEY_OF = {
    "embed": "model.d_model",
    "vocab": "model.vocab_size",
    "heads": "model.n_heads",
    "kv_heads": "model.n_kv_heads",
    "mlp": "model.ffn_dim",
    "lora_features": "mesh.fsdp",
}


def make_mesh(data: int, fsdp: int, tensor: int, devices=None) -> jax.sharding.Mesh:
  """A ('data', 'fsdp', 'tensor') mesh; one size may be -1 meaning 'all remaining devices'."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
  for name, size in sizes.items():
    if size == 0 or size < -1:
      raise LimaError(f"mesh.{name}={size}: mesh sizes must be positive, or -1 for the rest")
  free = [name for name, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise LimaError(f"mesh.{free[1]}=-1: only one mesh axis may be -1")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if len(devices) % fixed:
      raise LimaError(f"mesh: the fixed axes ({fixed} devices) do not divide the "
                      f"{len(devices)} available devices")
    sizes[free[0]] = len(devices) // fixed
  total = math.prod(sizes.values())
  if total != len(devices):
    raise LimaError(f"mesh: data*fsdp*tensor = {sizes['data']}*{sizes['fsdp']}*{sizes['tensor']}"
                    f" = {total}, but {len(devices)} devices are available")
  shape = tuple(sizes[a] for a in MESH_AXES)
  # Auto axes: XLA propagates shardings from our constraints (jax 0.10 defaults to Explicit).
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def spec_of(names) -> PartitionSpec:
  return PartitionSpec(*(LOGICAL_RULES[n] if n is not None else None for n in names))


@dataclasses.dataclass(frozen=True)
class Constrainer:
  """The `constrain(x, logical_names)` callable the model uses for activations.

  It also carries the mesh, for the attention kernels XLA cannot partition by itself (they run
  under shard_map). mesh=None: one device, nothing to constrain.
  """
  mesh: jax.sharding.Mesh | None = None

  def __call__(self, x, names):
    if self.mesh is None:
      return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec_of(names)))


def logical_names(abstract_state) -> dict:
  """Pure-dict tree of each param's logical axis names, from the model's annotations."""
  return nnx.to_pure_dict(jax.tree.map(
      lambda v: v.replace(tuple(v.get_metadata()["out_sharding"])), abstract_state,
      is_leaf=lambda x: isinstance(x, nnx.Variable)))


def param_shardings(names_tree, mesh):
  return jax.tree.map(lambda names: NamedSharding(mesh, spec_of(names)), names_tree,
                      is_leaf=lambda x: isinstance(x, tuple))


def check_divisible(shapes_tree, names_tree, mesh):
  """Every sharded dimension must divide its mesh axes: say which config key to change."""
  def check(path, shape, names):
    for dim, name in zip(shape.shape, names):
      axes = LOGICAL_RULES.get(name)
      if axes is None:
        continue
      axes = (axes,) if isinstance(axes, str) else axes
      ways = math.prod(mesh.shape[a] for a in axes)
      if dim % ways:
        key = _CONFIG_KEY_OF.get(name, name)
        raise LimaError(f"{key}: dimension '{name}' of {jax.tree_util.keystr(path)} is {dim}, "
                        f"not divisible by mesh axis {'*'.join(axes)}={ways}")
  jax.tree_util.tree_map_with_path(check, shapes_tree, names_tree,
                                   is_leaf=lambda x: isinstance(x, tuple))


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, spec_of(("batch", "length")))


def micro_batch_sharding(mesh) -> NamedSharding:
  """A train batch [micro_batches, rows, length]: every micro-batch split over the batch axes."""
  return NamedSharding(mesh, PartitionSpec(None, *spec_of(("batch", "length"))))


def batch_ways(mesh) -> int:
  """How many shards the batch's row dimension is split into."""
  return int(np.prod([mesh.shape[a] for a in LOGICAL_RULES["batch"]]))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
