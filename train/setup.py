"""The training set-up, built once from a config: spec, optimizer, mesh, abstract state, shardings and the jitted step.

`build(config)` is the single place that turns a config into the trainer's step; the trainer, the memory planner
(`scripts/plan.py`) and the benchmark (`scripts/bench_train.py`) all use it, so they compile the same program
(MoE loss coefficients and optimizer offload included).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from configs import base
from model import lora
from model import quant
from model import sharding
from model import transformer
from model.transformer import ModelSpec
from train import optim
from train import step as step_lib

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """Everything the train step needs, built once (see `build`). `abstract_state` leaves are ShapeDtypeStructs that
  carry their shardings; `batch_spec` describes the global batch ([batch_size, seq_len] per key)."""

  config: ml_collections.ConfigDict
  spec: ModelSpec
  graphdef: nnx.GraphDef
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  mesh: jax.sharding.Mesh
  param_specs: Any
  state_shardings: Any
  batch_sharding: jax.sharding.NamedSharding
  abstract_state: Any
  batch_spec: dict[str, jax.ShapeDtypeStruct]
  train_step: Any  # jitted fn(state, batch) -> (state, metrics); state donated

  def init_state(self, params=None):
    """A step-0 train state placed on its shardings: fresh parameters from train.seed, or `params` (fine-tuning;
    their buffers are donated). Optimizer state offloaded to host memory lands there. LoRA runs: `params` (or the
    fresh ones) are the float base model's; it is frozen (quantized first for QLoRA) and fresh adapters train."""
    seed = self.config.train.seed
    device_sh = jax.tree.map(lambda s: s.with_memory_kind("device"), self.state_shardings)
    if self.spec.lora_rank:
      return jax.device_put(self._lora_state(params), self.state_shardings)
    if params is None:
      state = jax.jit(lambda: step_lib.init_state(self.spec, self.optimizer, seed), out_shardings=device_sh)()
    else:
      state = jax.jit(lambda p: step_lib.state_from_params(p, self.optimizer, seed), out_shardings=device_sh,
                      donate_argnums=0)(params)
    return jax.device_put(state, self.state_shardings)

  def _lora_state(self, float_params=None):
    spec, seed = self.spec, self.config.train.seed
    float_spec = lora.base_spec(spec)
    if float_params is None:
      float_params = jax.jit(lambda: transformer.init_params(float_spec, seed))()
    fmt = lora.BASE_FORMATS[self.config.train.lora.base_quant]
    if fmt.get("quant") == "int8_weight":
      frozen = jax.jit(lambda p: quant.quantize_params(p, spec.tie_embeddings))(float_params)
    elif fmt.get("quant") == "packed":
      frozen = quant.pack_rtn(float_params, fmt["quant_bits"], fmt["quant_group_size"])
      if fmt.get("head_quant") == "int8":
        frozen = quant.quantize_head(frozen, spec.tie_embeddings)
    else:
      frozen = float_params
    adapters = jax.jit(lambda: lora.split(transformer.init_params(spec, seed))[0])()
    return jax.jit(lambda a, f: step_lib.state_from_params(a, self.optimizer, seed, f))(adapters, frozen)

  def compile(self):
    """The train step lowered and compiled for the abstract state and batch on this set-up's mesh."""
    with jax.set_mesh(self.mesh):  # activations' logical constraints resolve against this mesh while tracing
      return self.train_step.lower(self.abstract_state, self.batch_spec).compile()


def build(config: ml_collections.ConfigDict, devices=None, *, donate: bool = True) -> TrainSetup:
  """Validates `config` and builds its training set-up over `devices` (default: all). ValueError names the config key
  when the mesh does not divide the parameters or optimizer offload has no pinned host memory to use.
  `donate=False` only for measuring what donating the state saves."""
  base.validate(config)
  t = config.train
  spec = ModelSpec.from_config(config.model, t.lora)
  if spec.lora_rank and spec.quant != "none":
    spec = dataclasses.replace(spec, matmul_impl="xla")  # the native CPU kernels have no gradient (QLoRA's base)
  graphdef = transformer.graphdef(spec)
  abstract_params = jax.eval_shape(lambda: transformer.init_params(spec, t.seed))
  trained, frozen = lora.split(abstract_params) if spec.lora_rank else (abstract_params, None)
  optimizer = optim.make_optimizer(t, trained)
  schedule = optim.make_schedule(t)
  abstract_state = jax.eval_shape(lambda: step_lib.state_from_params(trained, optimizer, t.seed, frozen))
  mesh = sharding.make_mesh(dict(config.mesh), devices)
  param_specs = sharding.param_specs(transformer.abstract_model(spec))
  sharding.check_divisible(abstract_params, param_specs, mesh)
  trained_specs, frozen_specs = lora.split(param_specs) if spec.lora_rank else (param_specs, None)
  if t.offload_optimizer and not all("pinned_host" in {m.kind for m in d.addressable_memories()}
                                     for d in mesh.devices.flat if d.process_index == jax.process_index()):
    raise ValueError(f"config.train.offload_optimizer=True needs devices with pinned host memory; "
                     f"{jax.default_backend()} devices here have none")
  state_sh = sharding.state_shardings(mesh, abstract_state, trained_specs, optimizer, t.offload_optimizer, frozen_specs)
  batch_sh = sharding.batch_sharding(mesh)
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
                                state_sh)
  batch_spec = {k: jax.ShapeDtypeStruct((t.batch_size, config.data.seq_len),
                                       jnp.float32 if k == "weights" else jnp.int32, sharding=batch_sh)
                for k in BATCH_KEYS}
  train_step = step_lib.jit_train_step(graphdef, optimizer, schedule, t.grad_accum_steps, t.z_loss, state_sh,
                                       batch_sh, moe_coefs=(t.moe_aux_loss, t.router_z_loss),
                                       offload_optimizer=t.offload_optimizer, donate=donate)
  return TrainSetup(config=config, spec=spec, graphdef=graphdef, optimizer=optimizer, schedule=schedule, mesh=mesh,
                    param_specs=param_specs, state_shardings=state_sh, batch_sharding=batch_sh,
                    abstract_state=abstract_state, batch_spec=batch_spec, train_step=train_step)
