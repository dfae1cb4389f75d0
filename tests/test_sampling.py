"""The one sampler (`infer/sampling.py`) that `infer.generate` and the serving engine share."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infer import sampling
from infer.sampling import SamplingParams

sample = jax.jit(sampling.sample)


def test_top_k_and_top_p_keep_only_the_allowed_tokens():
  probs = np.array([0.05, 0.4, 0.02, 0.25, 0.2, 0.08])  # sorted: 1 (.4), 3 (.25), 4 (.2), 5 (.08), 0, 2
  rows = 4096
  logits = jnp.asarray(np.log(np.broadcast_to(probs, (rows, 6))), jnp.float32)

  def draw(seed, temperature=1.0, top_k=0, top_p=1.0):
    """One draw per row, every row with its own seed (so the rows are independent draws)."""
    return np.asarray(sample(logits, seed * rows + jnp.arange(rows, dtype=jnp.int32), jnp.zeros(rows, jnp.int32),
                             jnp.full(rows, temperature, jnp.float32), jnp.full(rows, top_k, jnp.int32),
                             jnp.full(rows, top_p, jnp.float32)))

  def seen(**kw):
    return set(np.unique(draw(0, **kw)).tolist())

  assert seen(top_p=0.6) == {1, 3}  # .4 < .6 <= .65: the two most likely tokens
  assert seen(top_p=0.7) == {1, 3, 4}
  assert seen(top_p=0.01) == {1}  # the top token is always kept
  assert seen(top_k=2) == {1, 3}
  assert seen(top_k=4, top_p=0.7) == {1, 3, 4}
  assert seen() == set(range(6))  # no filtering: every token appears in 4096 draws
  # Among kept tokens the renormalised probabilities are preserved: token 1 has .4/.65 of the nucleus {1, 3}.
  frac = np.mean(draw(1, top_p=0.6) == 1)
  assert abs(frac - 0.4 / 0.65) < 0.03
  np.testing.assert_array_equal(draw(2, temperature=0.0)[:2], [1, 1])


def test_each_row_keeps_its_own_top_k_and_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 3))
  counters = jnp.arange(3, dtype=jnp.int32)
  for seed in range(30):
    seeds = jnp.full((3,), seed, jnp.int32)
    out = sample(logits, seeds, counters, jnp.array([1.0, 1.0, 0.0]), jnp.array([2, 0, 0], jnp.int32),
                 jnp.array([1.0, 0.7, 1.0]))
    assert int(out[0]) in (0, 1)  # top-2
    assert int(out[1]) in (0, 1)  # nucleus 0.7: 0.5 + 0.3 reaches it
    assert int(out[2]) == 0  # greedy row


def test_a_rows_draw_depends_only_on_its_seed_and_counter():
  logits = jnp.zeros((4, 50), jnp.float32)  # uniform: every token possible
  settings = sampling.row_settings([SamplingParams(temperature=1.0, seed=s) for s in (7, 7, 8, 7)])
  out = np.asarray(sample(logits, counters=jnp.array([3, 3, 3, 4], jnp.int32), **settings))
  assert out[0] == out[1]  # same seed, same counter: same token, whatever its row
  alone = sampling.row_settings([SamplingParams(temperature=1.0, seed=7)])
  assert int(sample(logits[:1], counters=jnp.array([3], jnp.int32), **alone)[0]) == out[0]


@pytest.mark.parametrize("bad,match", [
    (dict(max_tokens=0), "max_tokens=0"), (dict(temperature=-1.0), "temperature"), (dict(top_k=-2), "top_k=-2"),
    (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"), (dict(seed=2**31), "seed")])
def test_bad_settings_are_refused_with_the_setting_named(bad, match):
  with pytest.raises(ValueError, match=match):
    SamplingParams(**bad).validate()


def test_a_top_p_that_rounds_to_zero_is_greedy_not_unfiltered():
  """top_p = 1e-50 passes validation (> 0) but is 0.0 in float32: only the top token may be drawn."""
  logits = jax.random.normal(jax.random.PRNGKey(0), (64, 50))
  settings = sampling.row_settings([SamplingParams(temperature=1.0, top_p=1e-50, seed=s) for s in range(64)])
  assert settings["top_p"].max() == 0.0  # the underflow this test is about
  drawn = sampling.sample(logits, jnp.asarray(settings["seeds"]), jnp.zeros(64, jnp.int32),
                          jnp.asarray(settings["temperature"]), jnp.asarray(settings["top_k"]),
                          jnp.asarray(settings["top_p"]))
  np.testing.assert_array_equal(np.asarray(drawn), np.asarray(jnp.argmax(logits, -1)))
