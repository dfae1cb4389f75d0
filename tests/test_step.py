"""Pure steps and optimizers: accumulation equals one big batch, losses respect weights, decay mask, schedules."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base, tiny
from model.transformer import ModelSpec
from train import optim
from train import step as step_lib
from model import transformer


def small_config(**train):
  c = tiny.get_config()
  c.model.update(num_layers=2, embed_dim=32, num_heads=4, vocab_size=61, max_len=16)
  c.data.seq_len = 16
  c.train.update({"batch_size": 8, "steps": 10, "warmup_steps": 2, **train})
  return base.validate(c)


def random_batch(seed, batch=8, length=16, vocab=61):
  rng = np.random.default_rng(seed)
  inputs = rng.integers(0, vocab, (batch, length)).astype(np.int32)
  targets = rng.integers(0, vocab, (batch, length)).astype(np.int32)
  # two packed documents per row with padding at the end; padding carries weight 0
  cut, end = rng.integers(3, 9, batch), rng.integers(12, length + 1, batch)
  col = np.arange(length)[None]
  segment_ids = np.where(col < cut[:, None], 1, np.where(col < end[:, None], 2, 0)).astype(np.int32)
  positions = np.where(segment_ids == 1, col, np.where(segment_ids == 2, col - cut[:, None], 0)).astype(np.int32)
  weights = (segment_ids > 0).astype(np.float32)
  return {"inputs": inputs, "targets": targets, "segment_ids": segment_ids, "positions": positions, "weights": weights}


def run_steps(config, batches):
  spec = ModelSpec.from_config(config.model)
  t = config.train
  params = transformer.init_params(spec, 0)
  optimizer = optim.make_optimizer(t, params)
  state = step_lib.init_state(spec, optimizer, 0)
  fn = step_lib.jit_train_step(transformer.graphdef(spec), optimizer, optim.make_schedule(t), t.grad_accum_steps,
                               t.z_loss)
  losses = []
  for b in batches:
    state, m = fn(state, b)
    losses.append(float(m["loss"]))
  return state, losses


# Lion is left out: its update is the sign of a momentum, so rounding-level gradient differences flip whole updates.
@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_gradient_accumulation_equals_one_big_batch(optimizer):
  batches = [random_batch(s) for s in range(3)]
  full, full_losses = run_steps(small_config(optimizer=optimizer, grad_accum_steps=1), batches)
  accum, accum_losses = run_steps(small_config(optimizer=optimizer, grad_accum_steps=4), batches)
  np.testing.assert_allclose(accum_losses, full_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4), accum["params"], full["params"])
  assert int(accum["step"]) == 3


def model_and_batch(seed):
  """(params, graphdef, batch, logits [B, L, V]) of the small model on a random packed batch."""
  spec = ModelSpec.from_config(small_config().model)
  params, graphdef, batch = transformer.init_params(spec, 0), transformer.graphdef(spec), random_batch(seed)
  logits = step_lib.nnx.merge(graphdef, params)(batch["inputs"], batch["positions"], batch["segment_ids"])
  return params, graphdef, batch, logits


def test_loss_ignores_padding_and_matches_a_direct_cross_entropy():
  params, graphdef, batch, logits = model_and_batch(5)
  _, (nll, weight, _) = step_lib.summed_loss(params, graphdef, batch, 0.0)
  logits = jax.nn.log_softmax(logits)
  direct = -np.take_along_axis(np.asarray(logits), batch["targets"][..., None], -1)[..., 0]
  np.testing.assert_allclose(float(nll), (direct * batch["weights"]).sum(), rtol=1e-5)
  assert float(weight) == batch["weights"].sum()
  changed = dict(batch, targets=np.where(batch["weights"] > 0, batch["targets"], (batch["targets"] + 1) % 61))
  assert float(step_lib.summed_loss(params, graphdef, changed, 0.0)[1][0]) == pytest.approx(float(nll), rel=1e-6)


def test_z_loss_adds_the_squared_log_partition():
  params, graphdef, batch, logits = model_and_batch(6)
  plain, _ = step_lib.summed_loss(params, graphdef, batch, 0.0)
  with_z, _ = step_lib.summed_loss(params, graphdef, batch, 1e-2)
  log_z = jax.nn.logsumexp(logits, -1)
  np.testing.assert_allclose(float(with_z - plain), 1e-2 * float((log_z**2 * batch["weights"]).sum()), rtol=1e-4)


def test_weight_decay_applies_to_matmul_weights_only():
  spec = ModelSpec.from_config(small_config().model)
  mask = optim.weight_decay_mask(transformer.init_params(spec, 0))
  assert mask["blocks"]["attn"]["wq"] and mask["blocks"]["mlp"]["w_out"]
  assert not mask["blocks"]["attn"]["bq"] and not mask["blocks"]["attn_norm"]["scale"]
  assert not mask["embed"] and not mask["pos_embed"] and not mask["final_norm"]["bias"]


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_warms_up_then_decays_to_the_floor(schedule):
  t = small_config(schedule=schedule, learning_rate=1e-2, warmup_steps=4, steps=20, min_lr_ratio=0.1).train
  lr = optim.make_schedule(t)
  assert float(lr(0)) == 0.0 and float(lr(2)) == pytest.approx(5e-3)
  assert float(lr(4)) == pytest.approx(1e-2)
  assert float(lr(20)) == pytest.approx(1e-2 if schedule == "constant" else 1e-3, rel=1e-5)


@pytest.mark.parametrize("optimizer,lr,ratio", [("adamw", 1e-2, 0.5), ("lion", 1e-3, 0.9), ("adafactor", 1e-1, 0.7)])
def test_training_steps_reduce_the_loss_on_a_fixed_batch(optimizer, lr, ratio):
  batch = random_batch(7)
  _, losses = run_steps(small_config(optimizer=optimizer, learning_rate=lr, steps=30, warmup_steps=1), [batch] * 30)
  assert losses[-1] < ratio * losses[0], losses


@pytest.mark.parametrize("optimizer", ["adamw", "lion", "adafactor"])
def test_weight_decay_scales_with_the_learning_rate(optimizer):
  """At step 0 the warmup learning rate is 0: a zero gradient must leave every parameter unchanged."""
  t = small_config(optimizer=optimizer, weight_decay=0.1, warmup_steps=2).train
  params = transformer.init_params(ModelSpec.from_config(small_config().model), 0)
  opt = optim.make_optimizer(t, params)
  updates, _ = opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
  assert max(float(jnp.abs(u).max()) for u in jax.tree.leaves(updates)) == 0.0


@pytest.mark.parametrize("chunk, tie", [(48, True), (128, False)])  # 128 tokens: 48 does not divide them (padding)
def test_chunked_cross_entropy_gives_the_same_loss_and_gradients(chunk, tie):
  """model.loss_chunk_tokens (the fast-path head + loss over token chunks, recomputed in the backward pass) equals
  the whole-logits reference: objective with z-loss within rtol 1e-6, every gradient within 1e-5."""
  config = small_config()
  config.model.tie_embeddings = tie
  spec = ModelSpec.from_config(config.model)
  chunked = dataclasses.replace(spec, loss_chunk_tokens=chunk)
  params, batch = transformer.init_params(spec, 0), random_batch(7)
  grad = jax.jit(jax.value_and_grad(step_lib.summed_loss, has_aux=True), static_argnums=(1, 3))
  (want, (nll, weight, _)), want_grads = grad(params, transformer.graphdef(spec), batch, 1e-3)
  (got, (got_nll, _, _)), got_grads = grad(params, transformer.graphdef(chunked), batch, 1e-3)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  np.testing.assert_allclose(float(got_nll), float(nll), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), got_grads, want_grads)


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_a_non_finite_step_is_not_applied(optimizer):
  """A NaN loss (one NaN weight in the batch) leaves parameters and optimizer state exactly as they were, advances
  the step and reports nonfinite=1; the next finite batch trains as if the bad one had never come."""
  config = small_config(optimizer=optimizer)
  spec = ModelSpec.from_config(config.model)
  t = config.train
  params = transformer.init_params(spec, 0)
  opt = optim.make_optimizer(t, params)
  fn = step_lib.jit_train_step(transformer.graphdef(spec), opt, optim.make_schedule(t), 1, 0.0, donate=False)
  state = step_lib.init_state(spec, opt, 0)
  bad = random_batch(1)
  bad["weights"] = bad["weights"].copy()
  bad["weights"][0, 0] = np.nan
  after_bad, m = fn(state, bad)
  assert int(m["nonfinite"]) == 1 and not np.isfinite(float(m["loss"]))
  assert int(after_bad["step"]) == 1
  for a, b in zip(jax.tree.leaves((state["params"], state["opt_state"])),
                  jax.tree.leaves((after_bad["params"], after_bad["opt_state"]))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  good = random_batch(2)
  from_bad, m_good = fn(after_bad, good)
  assert int(m_good["nonfinite"]) == 0
  clean, _ = fn(state, good)
  for a, b in zip(jax.tree.leaves(from_bad["params"]), jax.tree.leaves(clean["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the optimizer (and its schedule) never counted it
