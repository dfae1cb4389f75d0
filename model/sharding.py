"""Logical axis names and the one table that maps them to mesh axes.

Parameters carry logical names in their `logical_axes` metadata (e.g. ("layers", "embed", "mlp")), ready to be mapped
to parameter shardings by the scale-out work; activations are constrained with `constrain(x, names)`, a no-op without
an active mesh (`jax.set_mesh`), so single-device code pays nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import optax
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import PartitionSpec

from configs.base import MESH_AXES

# logical name -> mesh axes it is split over (first match wins; an axis is used once per array).
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("expert", "expert"),
    ("layers", "pipeline"),  # stacked blocks: pipeline stage s holds its contiguous share of the layers
)


def logical_to_spec(names: Sequence[str | None], mesh_axes: Sequence[str] | None = None) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec using LOGICAL_RULES; axes absent from the mesh are dropped."""
  rules = dict(LOGICAL_RULES)
  used: set[str] = set()
  spec = []
  for name in names:
    target = rules.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a not in used and (mesh_axes is None or a in mesh_axes))
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return PartitionSpec(*spec)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Applies a sharding constraint from logical names when a mesh is active; otherwise returns x unchanged."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, mesh.axis_names))


def mesh_shape(sizes: dict[str, int], device_count: int) -> tuple[int, ...]:
  """Resolves per-axis sizes (in MESH_AXES order; one may be -1 to take all remaining devices) for `device_count`
  available devices. Without a -1 the mesh uses the first prod(sizes) devices. ValueError names the sizes when they
  cannot tile the devices."""
  values = [int(sizes[a]) for a in MESH_AXES]
  if sum(v == -1 for v in values) > 1 or any(v == 0 or v < -1 for v in values):
    raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, values))}: each must be a positive int, and at most one -1")
  known = 1
  for v in values:
    known *= v if v > 0 else 1
  if (device_count % known) if -1 in values else (known > device_count):
    raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, values))} multiply to {known}, which does not fit the "
                     f"{device_count} available devices (with a -1 axis the product must divide them)")
  return tuple(device_count // known if v == -1 else v for v in values)


def make_mesh(sizes: dict, devices=None) -> jax.sharding.Mesh:
  """A mesh over `devices` (default: all) with axes MESH_AXES, Auto axis types (GSPMD propagation + our rules).

  `sizes` holds the ICI size of each axis and optionally `dcn`: {axis: size} across slices (TPU multi-slice) or
  processes (other platforms). With DCN sizes, the ICI sizes describe one slice/process and each mesh axis is
  ICI x DCN long, laid out by `mesh_utils.create_hybrid_device_mesh` so that only the DCN part crosses the slow
  network."""
  devices = jax.devices() if devices is None else devices
  dcn = [int((sizes.get("dcn") or {}).get(a, 1)) for a in MESH_AXES]
  granules = 1
  for v in dcn:
    granules *= v
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if granules == 1:
    shape = mesh_shape(sizes, len(devices))
    count = 1
    for v in shape:
      count *= v
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices[:count])
  if len(devices) % granules:
    raise ValueError(f"DCN sizes {dict(zip(MESH_AXES, dcn))} multiply to {granules}, which does not divide the "
                     f"{len(devices)} devices")
  ici = mesh_shape(sizes, len(devices) // granules)
  grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=devices[0].platform != "tpu",
                                              allow_split_physical_axes=True)
  return jax.sharding.Mesh(grid, MESH_AXES, axis_types=axis_types)


def state_shardings(mesh: jax.sharding.Mesh, abstract_state: dict, param_spec_tree: dict, optimizer,
                    offload_optimizer: bool = False, frozen_spec_tree: dict | None = None) -> dict:
  """NamedShardings for the train state {step, params, opt_state, rng} (+ frozen, with `frozen_spec_tree`, for
  LoRA runs): params by their logical rules, optimizer moments like the parameter they belong to (when shaped like
  it; factored statistics are replicated), the rest replicated. ZeRO-3 / FSDP falls out of the rules: 'embed'
  dimensions split over the fsdp axis. `offload_optimizer` places the optimizer state in pinned host memory
  (ZeRO-Offload)."""
  named = lambda spec: jax.sharding.NamedSharding(mesh, spec)  # noqa: E731
  replicated = named(PartitionSpec())
  params_sh = jax.tree.map(named, param_spec_tree, is_leaf=lambda x: isinstance(x, PartitionSpec))
  opt_sh = optax.tree_map_params(
      optimizer, lambda leaf, sh, p: sh if getattr(leaf, "shape", None) == p.shape else replicated,
      abstract_state["opt_state"], params_sh, abstract_state["params"],
      transform_non_params=lambda _: replicated)
  if offload_optimizer:
    opt_sh = jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), opt_sh)
  out = {"step": replicated, "params": params_sh, "opt_state": opt_sh, "rng": replicated}
  if frozen_spec_tree is not None:
    out["frozen"] = jax.tree.map(named, frozen_spec_tree, is_leaf=lambda x: isinstance(x, PartitionSpec))
  return out


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """[batch, length] inputs split over the batch axes of the rules."""
  return jax.sharding.NamedSharding(mesh, logical_to_spec(("batch", "length"), mesh.axis_names))


def param_specs(abstract_model) -> dict:
  """PartitionSpecs (pure-dict tree like `nnx.to_pure_dict`) for a model's parameters from their `logical_axes`."""
  state = nnx.state(abstract_model, nnx.Param)
  return nnx.to_pure_dict(jax.tree.map(lambda v: v.replace(logical_to_spec(v.get_metadata()["logical_axes"])), state,
                                       is_leaf=lambda x: isinstance(x, nnx.Variable)))


def check_divisible(abstract_params: dict, specs: dict, mesh: jax.sharding.Mesh) -> None:
  """ValueError naming the parameter, dimension and mesh axis when a sharded dimension does not divide evenly."""
  def check(path, leaf, spec):
    for dim, axes in zip(leaf.shape, tuple(spec)):
      names = (axes,) if isinstance(axes, str) else tuple(axes or ())
      size = 1
      for name in names:
        size *= mesh.shape[name]
      if dim % size:
        key = "/".join(str(getattr(p, "key", p)) for p in path)
        raise ValueError(f"parameter {key} dimension {dim} is sharded over mesh axes {names} of total size {size}, "
                         "which does not divide it; change the mesh sizes or the model shape")
  jax.tree_util.tree_map_with_path(check, abstract_params, specs,
                                   is_leaf=lambda x: isinstance(x, PartitionSpec))
