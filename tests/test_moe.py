"""Mixture of experts: routing against a dense reference, dropless and capacity dispatch, auxiliary losses, the MoE
model in training and generation, and expert parallelism over 8 simulated devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base, moe_tiny
from model import flops, moe, sharding
from model.transformer import ModelSpec, Transformer
from train import optim
from train import step as step_lib
from test_sharding import batches  # the same random token batches as the dense sharding tests
from model import transformer


def _weights(seed, t=40, d=16, e=6, f=24, gated=False):
  ks = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(ks[0], (t, d))
  router = jax.random.normal(ks[1], (d, e))
  w_in = jax.random.normal(ks[2], (e, d, f)) / 4
  w_gate = jax.random.normal(ks[3], (e, d, f)) / 4 if gated else None
  w_out = jax.random.normal(ks[4], (e, f, d)) / 5
  return x, router, w_in, w_gate, w_out


@pytest.mark.parametrize("k,renormalize,gated", [(1, False, False), (2, True, False), (2, True, True), (3, False, True)])
def test_routing_and_dropless_experts_match_the_dense_reference(k, renormalize, gated):
  x, router, w_in, w_gate, w_out = _weights(k, gated=gated)
  r = moe.route(x, router, k, renormalize)
  probs = np.asarray(jax.nn.softmax(x @ router, axis=-1))
  order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
  np.testing.assert_array_equal(np.asarray(r.expert_ids), order)
  chosen = np.take_along_axis(probs, order, 1)
  np.testing.assert_allclose(np.asarray(r.weights), chosen / chosen.sum(1, keepdims=True) if renormalize else chosen,
                             rtol=1e-6)
  act = "silu" if gated else "gelu"
  ref = moe.dense_reference(x, r, w_in, w_gate, w_out, act)
  got = jax.jit(moe.dropless_experts, static_argnums=5)(x, r, w_in, w_gate, w_out, act)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
  big, dropped = moe.capacity_experts(x, r, w_in, w_gate, w_out, act, capacity_factor=float(w_in.shape[0]))
  assert float(dropped) == 0
  np.testing.assert_allclose(np.asarray(big), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_capacity_drops_exactly_the_overflow_and_counts_it():
  x, router, w_in, _, w_out = _weights(7, t=50, e=4)
  r = moe.route(x, router, 2, True)
  cap = moe.capacity(50, 2, 4, 0.5)  # 13 slots per expert for 100 assignments: some must drop
  y, dropped = moe.capacity_experts(x, r, w_in, None, w_out, "gelu", 0.5)
  ids = np.asarray(r.expert_ids)
  kept = np.zeros(ids.shape, bool)
  used = np.zeros(4, int)
  for choice in range(2):  # first choices of all tokens get slots before any second choice
    for t in range(50):
      e = ids[t, choice]
      kept[t, choice] = used[e] < cap
      used[e] += 1
  assert float(dropped) == (~kept).sum() > 0
  masked = moe.Routing(r.expert_ids, jnp.where(kept, r.weights, 0.0), r.probs, r.logits)
  np.testing.assert_allclose(np.asarray(y), np.asarray(moe.dense_reference(x, masked, w_in, None, w_out, "gelu")),
                             rtol=1e-5, atol=1e-5)


def test_load_balancing_loss_is_one_for_uniform_routing_and_larger_when_skewed():
  t, e = 64, 8
  uniform = moe.Routing(jnp.tile(jnp.arange(e), t // e)[:, None], jnp.ones((t, 1)), jnp.full((t, e), 1 / e),
                        jnp.zeros((t, e)))
  aux = moe.aux_losses(uniform)
  assert float(aux["load_balance"]) == pytest.approx(1.0, rel=1e-6)
  assert float(aux["router_z"]) == pytest.approx(np.log(e) ** 2, rel=1e-5)
  logits = jnp.zeros((t, e)).at[:, 0].set(10.0)
  skewed = moe.route(jnp.eye(e)[jnp.zeros(t, int)], logits[:e], 1, False)
  assert float(moe.aux_losses(skewed)["load_balance"]) > 0.9 * e


def _tiny_moe(**model):
  c = moe_tiny.get_config()
  c.model.update(vocab_size=64, embed_dim=32, num_layers=4, max_len=16, **model)
  c.data.seq_len = 16
  c.train.update(batch_size=8, steps=10, warmup_steps=1, learning_rate=1e-2)
  return base.validate(c)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_moe_model_counts_trains_and_decodes(family):
  c = _tiny_moe(family=family)
  spec = ModelSpec.from_config(c.model)
  model = Transformer(spec, rngs=nnx.Rngs(params=0))
  assert flops.tree_param_count(model) == flops.param_count(spec)
  assert model.blocks.layers[1].moe.w_in.shape == (2, 8, 32, 128)  # [units, experts, embed, expert width]
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 64)
  logits, aux = model.forward_with_aux(tokens)
  assert logits.shape == (2, 12, 64) and float(aux["load_balance"]) >= 0.99 and float(aux["dropped"]) == 0
  # the KV-cache path (scanned groups and the unstacked per-group modules) agrees with the full forward
  cache = model.init_cache(2, 16)
  step_logits, cache = model.extend(tokens[:, :8], jnp.broadcast_to(jnp.arange(8), (2, 8)), jnp.ones((2, 8), jnp.int32),
                                    cache)
  np.testing.assert_allclose(np.asarray(step_logits), np.asarray(logits[:, :8]), atol=2e-5)
  unstacked = model.unstacked()
  last, _ = unstacked.extend(tokens[:, 8:9], jnp.full((2, 1), 8), jnp.ones((2, 1), jnp.int32), cache)
  np.testing.assert_allclose(np.asarray(last[:, 0]), np.asarray(logits[:, 8]), atol=2e-5)


def _train(c, mesh_sizes, data):
  spec = ModelSpec.from_config(c.model)
  params = jax.eval_shape(lambda: transformer.init_params(spec, 0))
  optimizer = optim.make_optimizer(c.train, params)
  abstract_state = jax.eval_shape(lambda: step_lib.init_state(spec, optimizer, 0))
  mesh = sharding.make_mesh(mesh_sizes)
  specs = sharding.param_specs(nnx.eval_shape(lambda: Transformer(spec, rngs=nnx.Rngs(params=0))))
  state_sh = sharding.state_shardings(mesh, abstract_state, specs, optimizer)
  state = jax.jit(lambda: step_lib.init_state(spec, optimizer, 0), out_shardings=state_sh)()
  with jax.set_mesh(mesh):
    fn = step_lib.jit_train_step(transformer.graphdef(spec), optimizer, optim.make_schedule(c.train), 1, 0.0,
                                 state_sh, sharding.batch_sharding(mesh), moe_coefs=(0.01, 0.001))
    losses, metrics = [], []
    for b in data:
      state, m = fn(state, b)
      losses.append(float(m["loss"]))
      metrics.append(jax.device_get(m))
  return state, losses, metrics, state_sh


def test_expert_parallel_training_equals_one_device():
  c = _tiny_moe()
  data = batches(4)
  one = {a: 1 for a in sharding.MESH_AXES}
  state1, losses1, metrics1, _ = _train(c, one, data)
  state8, losses8, metrics8, sh = _train(c, {**one, "data": 2, "expert": 4}, data)
  np.testing.assert_allclose(losses8, losses1, rtol=2e-5)
  assert losses1[-1] < losses1[0]
  for key in ("moe_load_balance", "moe_router_z"):
    assert metrics8[0][key] == pytest.approx(float(metrics1[0][key]), rel=1e-4)
  assert float(metrics8[0]["moe_dropped"]) == 0.0
  w_in = state8["params"]["blocks"]["layers"][1]["moe"]["w_in"]
  assert w_in.sharding.spec[1] == "expert"  # [units, experts, embed, mlp]: experts split 4 ways
  assert w_in.addressable_shards[0].data.shape[1] == 2
  for a, b in zip(jax.tree.leaves(state1["params"]), jax.tree.leaves(state8["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5)


def test_capacity_factor_training_logs_dropped_tokens():
  c = _tiny_moe(capacity_factor=0.5)
  _, losses, metrics, _ = _train(c, {a: 1 for a in sharding.MESH_AXES}, batches(2))
  assert np.isfinite(losses).all() and 0.0 < float(metrics[0]["moe_dropped"]) < 1.0


def test_moe_config_errors_name_the_key():
  c = _tiny_moe()
  c.model.experts_per_token = 9
  with pytest.raises(ValueError, match="model.experts_per_token=9"):
    base.validate(c)
  c = _tiny_moe()
  c.model.moe_every = 3
  with pytest.raises(ValueError, match="model.moe_every=3"):
    base.validate(c)
  c = _tiny_moe()
  c.mesh.expert = 3
  with pytest.raises(ValueError, match="mesh.expert=3"):
    base.validate(c)
  dense = moe_tiny.get_config()
  dense.model.num_experts = 0
  dense.mesh.expert = 2
  with pytest.raises(ValueError, match="mesh.expert=2"):
    base.validate(dense)


def test_expert_parallel_inference_equals_one_device():
  """The forward pass (scoring, prefill) under a data 2 x expert 4 mesh, experts sharded by the rules."""
  c = _tiny_moe(family="llama")
  spec = ModelSpec.from_config(c.model)
  model = Transformer(spec, rngs=nnx.Rngs(params=3))
  tokens = jax.random.randint(jax.random.key(4), (8, 16), 0, 64)
  want, want_aux = model.forward_with_aux(tokens)
  mesh = sharding.make_mesh({**{a: 1 for a in sharding.MESH_AXES}, "data": 2, "expert": 4})
  graphdef, state = nnx.split(model)
  specs = sharding.param_specs(model)
  params = jax.device_put(nnx.to_pure_dict(state), jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), specs,
                                                                 is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
  with jax.set_mesh(mesh):
    got, got_aux = jax.jit(lambda p, t: nnx.merge(graphdef, p).forward_with_aux(t))(params, tokens)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
  assert float(got_aux["load_balance"]) == pytest.approx(float(want_aux["load_balance"]), rel=1e-5)


def test_padding_takes_no_expert_slot_and_is_not_counted_as_dropped():
  x, router, w_in, _, w_out = _weights(11, t=12, e=2)
  del router
  r = moe.Routing(jnp.zeros((12, 1), jnp.int32), jnp.ones((12, 1)), None, None)  # every token goes to expert 0
  valid = jnp.arange(12) >= 4  # the first four tokens are padding
  cap = moe.capacity(12, 1, 2, 1.0)  # 6 slots per expert: exactly the six real tokens 4..9 fit
  slot, kept = moe.dispatch_positions(r.expert_ids, 2, cap, valid)
  np.testing.assert_array_equal(np.asarray(kept[:, 0]), (np.arange(12) >= 4) & (np.arange(12) < 10))
  y, dropped = moe.capacity_experts(x, r, w_in, None, w_out, "gelu", 1.0, valid)
  assert float(dropped) == 2  # tokens 10 and 11; padding is not counted
  assert float(jnp.abs(y[:4]).max()) == 0.0
