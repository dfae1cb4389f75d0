"""Logical axis names and the one table that maps them to mesh axes.

Parameters carry logical names in their `logical_axes` metadata (e.g. ("layers", "embed", "mlp")), ready to be mapped
to parameter shardings by the scale-out work; activations are constrained with `constrain(x, names)`, a no-op without
an active mesh (`jax.set_mesh`), so single-device code pays nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "pipeline", "expert")

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
    ("layers", None),
    ("stage", "pipeline"),
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
