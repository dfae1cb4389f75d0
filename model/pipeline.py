"""GPipe pipeline parallelism over the mesh's `pipeline` axis (`jax.shard_map` + `ppermute`).

The stacked block parameters [layers, ...] are split along `layers` over the pipeline axis (the `layers` logical rule),
so stage s holds layers [s * L/S, (s + 1) * L/S). A batch is cut into M micro-batches (strided rows, so every data
shard holds an equal part of each). At clock tick t stage 0 takes micro-batch t, every stage runs its layers on what
it holds, and `ppermute` passes the result to the next stage; after M + S - 1 ticks the last stage has produced every
micro-batch's output. The schedule is one `lax.scan`, so reverse-mode autodiff gives the backward pipeline
(`ppermute`'s transpose sends the gradients back a stage per tick). Only the pipeline axis is manual: data, FSDP and
tensor sharding inside each stage stay with the compiler, so pipelining composes with them.

Idle ticks (the bubble) are (S - 1) / (M + S - 1) of the schedule; `bubble_fraction` reports it and the trainer logs
it. Only the blocks are pipelined: embedding, final norm and head run outside (sharded over the other axes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

AXIS = "pipeline"


def bubble_fraction(stages: int, microbatches: int) -> float:
  """Fraction of GPipe clock ticks a stage spends idle: (S - 1) / (M + S - 1)."""
  return (stages - 1) / (microbatches + stages - 1)


def default_microbatches(stages: int, configured: int) -> int:
  return configured or 2 * stages


def stages_of_active_mesh() -> int:
  """The size of the active mesh's pipeline axis (`jax.set_mesh`); 1 without a mesh or without that axis."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh is None or mesh.empty else dict(mesh.shape).get(AXIS, 1)


def _varying(x: jax.Array) -> jax.Array:
  """Marks a value as differing across pipeline stages (shard_map's varying-manual-axes type)."""
  if hasattr(jax.lax, "pcast"):
    return jax.lax.pcast(x, (AXIS,), to="varying")
  return jax.lax.pvary(x, (AXIS,))


def _split(tree, m: int):
  """[B, ...] leaves -> [M, B / M, ...] with micro-batch i holding rows i, i + M, i + 2M, ..."""
  return jax.tree.map(lambda a: a.reshape(a.shape[0] // m, m, *a.shape[1:]).swapaxes(0, 1), tree)


def _merge(a: jax.Array) -> jax.Array:
  """Inverse of `_split` for one array: [M, B / M, ...] -> [B, ...]."""
  return a.swapaxes(0, 1).reshape(a.shape[0] * a.shape[1], *a.shape[2:])


def run_blocks(model, x: jax.Array, positions: jax.Array, visibility) -> jax.Array:
  """The model's blocks as a GPipe pipeline over the active mesh's S pipeline stages. x [B, L, D]; positions
  [B, L]; visibility with [B, L] fields. Returns x after all blocks [B, L, D] (MoE models are not pipelined).
  Called by `Transformer._run_blocks` when the active mesh has a pipeline axis larger than 1."""
  spec = model.spec
  stages = stages_of_active_mesh()
  m = default_microbatches(stages, spec.pipeline_microbatches)
  if x.shape[0] % m:
    raise ValueError(f"batch {x.shape[0]} is not divisible by pipeline_microbatches={m}")
  graphdef, params = nnx.split(model.blocks)
  inputs = _split((x, positions, visibility), m)
  ticks = m + stages - 1

  def stage_fn(local_params, inputs):
    stage = jax.lax.axis_index(AXIS)
    xs, pos, vis = inputs
    first = lambda a: jnp.zeros_like(a[0])  # noqa: E731

    def tick(carry, t):
      held, outputs = carry
      mb = jnp.clip(t - stage, 0, m - 1)  # the micro-batch this stage works on at tick t
      pick = lambda a: jax.lax.dynamic_index_in_dim(a, mb, keepdims=False)  # noqa: E731
      h = jnp.where(stage == 0, pick(xs), held)
      h, _, _ = model.scan_units(graphdef, local_params, h, pick(pos), jax.tree.map(pick, vis))
      done = (stage == stages - 1) & (t >= stages - 1)
      outputs = jax.lax.dynamic_update_index_in_dim(
          outputs, jnp.where(done, h, pick(outputs)), mb, axis=0)
      held = jax.lax.ppermute(h, AXIS, [(i, i + 1) for i in range(stages - 1)])
      return (held, outputs), None

    init = jax.tree.map(_varying, (first(xs), jnp.zeros_like(xs)))  # the carries differ from stage to stage
    (_, outputs), _ = jax.lax.scan(tick, init, jnp.arange(ticks))
    return outputs[None]  # only the last stage's copy is kept (a psum here would scale the backward pass)

  param_specs = jax.tree.map(lambda _: P(AXIS), params)
  input_specs = jax.tree.map(lambda _: P(), inputs)
  out = jax.shard_map(stage_fn, in_specs=(param_specs, input_specs), out_specs=P(AXIS), axis_names={AXIS})(
      params, inputs)
  return _merge(out[stages - 1])
