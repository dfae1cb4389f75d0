"""Pure training and evaluation steps.

The train state is a plain pytree `{"step", "params", "opt_state", "rng"}` whose params are the model's pure dict
(`nnx.to_pure_dict`), so optax, orbax and jit see nothing but arrays. LoRA runs (`model/lora.py`) keep only the
adapters as `params` (what trains and has optimizer state) and add `"frozen"`, the rest of the model. Batches are
dicts of [B, L] arrays: inputs, targets, segment_ids, positions (int32) and weights (float32, 0 on padding).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from model import lora
from model import transformer
from model.transformer import ModelSpec

TrainState = dict[str, Any]
Batch = dict[str, jax.Array]


def init_state(spec: ModelSpec, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
  """A step-0 train state with fresh parameters from `seed` (call under jit to build it on device)."""
  return state_from_params(transformer.init_params(spec, seed), optimizer, seed)


def state_from_params(params: dict, optimizer: optax.GradientTransformation, seed: int,
                      frozen: dict | None = None) -> TrainState:
  """A step-0 train state around given parameters (fresh optimizer state), e.g. to fine-tune imported weights;
  `frozen`: the parameters that do not train (a LoRA run's base), kept beside them without optimizer state."""
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params),
           "rng": jax.random.key_data(jax.random.key(seed + 1))}
  return state if frozen is None else {**state, "frozen": frozen}


def model_params(state: TrainState) -> dict:
  """The whole parameter dict of the model a train state holds (a LoRA run's adapters and frozen base together)."""
  return lora.combine(state["params"], state["frozen"]) if "frozen" in state else state["params"]


def token_losses(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-token negative log-likelihood and log-partition, both float32 [B, L]. logits [B, L, V] float32."""
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return log_z - target_logit, log_z


def chunked_token_losses(model, features: jax.Array, targets: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
  """`token_losses` of `model.head_logits(features)` computed `chunk` tokens at a time under `jax.checkpoint`, so
  only one chunk's [chunk, vocab] logits exist at once, in the forward and the backward pass. features [B, L, D],
  targets [B, L] -> (nll, log_z) float32 [B, L]."""
  b, l, d = features.shape
  n = b * l
  pad = -n % chunk
  x = jnp.pad(features.reshape(n, d), ((0, pad), (0, 0))).reshape(-1, 1, chunk, d)
  t = jnp.pad(targets.reshape(n), (0, pad)).reshape(-1, 1, chunk)

  @jax.checkpoint
  def one(carry, xt):
    return carry, token_losses(model.head_logits(xt[0]), xt[1])

  _, (nll, log_z) = jax.lax.scan(one, None, (x, t))
  return nll.reshape(-1)[:n].reshape(b, l), log_z.reshape(-1)[:n].reshape(b, l)


def summed_loss(params: dict, graphdef: nnx.GraphDef, batch: Batch, z_loss: float,
                moe_coefs: tuple[float, float] = (0.0, 0.0), frozen: dict | None = None, dropout_key=None):
  """Sum over real tokens of NLL (+ z_loss * log(Z)^2), plus for MoE models the batch's load-balancing and router
  z-losses times `moe_coefs` times the token count (so they enter the per-token mean with their coefficients).
  `frozen`: the rest of the model when `params` are LoRA adapters; `dropout_key`: the adapters' dropout.
  Returns (objective_sum, (nll_sum, weight_sum, moe_sums)) with moe_sums the MoE terms times the token count."""
  model = nnx.merge(graphdef, params if frozen is None else lora.combine(params, frozen))
  with lora.dropout_key(dropout_key):
    return _summed_loss(model, batch, z_loss, moe_coefs)


def _summed_loss(model, batch: Batch, z_loss: float, moe_coefs: tuple[float, float]):
  if model.spec.loss_chunk_tokens:
    features, moe = model.features_with_aux(batch["inputs"], batch["positions"], batch["segment_ids"])
    nll, log_z = chunked_token_losses(model, features, batch["targets"], model.spec.loss_chunk_tokens)
  else:
    logits, moe = model.forward_with_aux(batch["inputs"], batch["positions"], batch["segment_ids"])
    nll, log_z = token_losses(logits, batch["targets"])
  w = batch["weights"].astype(jnp.float32)
  nll_sum, weight = jnp.sum(nll * w), jnp.sum(w)
  objective = nll_sum + z_loss * jnp.sum(jnp.square(log_z) * w) if z_loss else nll_sum
  if model.spec.num_experts:
    objective = objective + weight * (moe_coefs[0] * moe["load_balance"] + moe_coefs[1] * moe["router_z"])
  return objective, (nll_sum, weight, {k: v * weight for k, v in moe.items()})


def train_step(state: TrainState, batch: Batch, *, graphdef: nnx.GraphDef,
               optimizer: optax.GradientTransformation, schedule: optax.Schedule, grad_accum_steps: int,
               z_loss: float, moe_coefs: tuple[float, float] = (0.0, 0.0),
               offload_optimizer: bool = False) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update on `batch` ([B, L] arrays), accumulating gradients over `grad_accum_steps` micro-batches.

  Gradients of the summed loss are added over micro-batches and divided once by the batch's total token weight, so
  the update equals the full-batch update up to floating-point rounding.
  """
  grad_fn = jax.value_and_grad(summed_loss, has_aux=True)
  params, frozen = state["params"], state.get("frozen")
  spec = nnx.merge(graphdef, model_params(state)).spec
  # LoRA dropout: a key per step (and micro-batch) from the state's RNG; nothing random otherwise
  step_key = (jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
              if spec.lora_rank and spec.lora_dropout else None)
  if grad_accum_steps == 1:
    (objective, (nll, weight, moe)), grads = grad_fn(params, graphdef, batch, z_loss, moe_coefs, frozen, step_key)
  else:
    micro = jax.tree.map(lambda x: x.reshape(grad_accum_steps, x.shape[0] // grad_accum_steps, *x.shape[1:]), batch)
    micro = (micro, jnp.arange(grad_accum_steps))

    def accumulate(carry, mb):
      mb, index = mb
      key = None if step_key is None else jax.random.fold_in(step_key, index)
      (objective, (nll, weight, moe)), grads = grad_fn(params, graphdef, mb, z_loss, moe_coefs, frozen, key)
      return jax.tree.map(jnp.add, carry, (objective, nll, weight, moe, grads)), None

    moe_zeros = {k: jnp.zeros(()) for k in ("load_balance", "router_z", "dropped")}
    zeros = (jnp.zeros(()), jnp.zeros(()), jnp.zeros(()), moe_zeros, jax.tree.map(jnp.zeros_like, params))
    (objective, nll, weight, moe, grads), _ = jax.lax.scan(accumulate, zeros, micro)
  denom = jnp.maximum(weight, 1.0)
  grads = jax.tree.map(lambda g: g / denom, grads)
  grad_norm = optax.tree.norm(grads)
  # A NaN/inf loss or gradient is never applied: the update runs under a cond, so a bad step leaves parameters and
  # optimizer state as they were, the step counter advances with the data, and metrics["nonfinite"] says so.
  finite = jnp.isfinite(objective) & jnp.isfinite(grad_norm)
  opt_state = state["opt_state"]
  if offload_optimizer:  # the moments live in host memory between steps; bring them in for the update only
    opt_state = jax.tree.map(lambda x: jax.device_put(x, jax.memory.Space.Device), opt_state)

  def apply(operands):
    params, opt_state = operands
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  new_params, new_opt_state = jax.lax.cond(finite, apply, lambda operands: operands, (params, opt_state))
  if offload_optimizer:
    new_opt_state = jax.tree.map(lambda x: jax.device_put(x, jax.memory.Space.Host), new_opt_state)
  new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": new_opt_state, "rng": state["rng"]}
  if frozen is not None:
    new_state["frozen"] = frozen
  metrics = {"loss": nll / denom, "objective": objective / denom, "grad_norm": grad_norm,
             "learning_rate": schedule(state["step"]), "tokens": weight,
             "nonfinite": jnp.logical_not(finite).astype(jnp.int32)}
  if spec.num_experts:
    metrics.update({f"moe_{k}": v / denom for k, v in moe.items()})
  return new_state, metrics


def eval_step(params: dict, batch: Batch, *, graphdef: nnx.GraphDef) -> dict[str, jax.Array]:
  """Summed NLL and token count of one batch (sum, so batches combine exactly); params: the whole model's
  (`model_params`)."""
  _, (nll, weight, _) = summed_loss(params, graphdef, batch, 0.0)
  return {"nll_sum": nll, "weight_sum": weight}


def jit_train_step(graphdef, optimizer, schedule, grad_accum_steps: int, z_loss: float, state_shardings=None,
                   batch_sharding=None, moe_coefs: tuple[float, float] = (0.0, 0.0), offload_optimizer: bool = False,
                   donate: bool = True):
  """The train step jitted with the state donated (its buffers are reused for the new state; `donate=False` only
  for measuring what that saves); with shardings, the state keeps its layout across steps and batches are split
  as `batch_sharding` says."""
  fn = functools.partial(train_step, graphdef=graphdef, optimizer=optimizer, schedule=schedule,
                         grad_accum_steps=grad_accum_steps, z_loss=z_loss, moe_coefs=moe_coefs,
                         offload_optimizer=offload_optimizer)
  donated = (0,) if donate else ()
  if state_shardings is None:
    return jax.jit(fn, donate_argnums=donated)
  return jax.jit(fn, donate_argnums=donated, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, None))


def jit_eval_step(graphdef):
  return jax.jit(functools.partial(eval_step, graphdef=graphdef))
