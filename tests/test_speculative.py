"""Prompt-lookup speculative decoding: drafts from the context, greedy output identical to ordinary decoding, sampled
output distributed as ordinary decoding's (against the exact distribution on a small vocabulary)."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import random_model
from infer import generate as G
from infer import speculative
from infer.engine import Engine
from infer.sampling import SamplingParams


def small_model(family="gpt", vocab=97, max_len=48, seed=1, layers=2):
  return random_model(family, vocab, max_len, seed, layers)


def test_drafts_follow_the_most_recent_longest_match():
  history = jnp.asarray([[1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3, 0, 0],   # "1 2 3" last seen followed by 7 8 5
                         [4, 4, 6, 5, 9, 9, 9, 9, 9, 9, 9, 1, 6, 0, 0],   # only the 1-gram "6" matches (at 2)
                         [3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 7, 0, 0]], jnp.int32)  # "7" never seen before
  drafts = speculative.lookup_drafts(history, jnp.int32(12), k=3, ngram=3)
  np.testing.assert_array_equal(drafts, [[7, 8, 5], [5, 9, 9], [7, 7, 7]])


def test_greedy_lookup_gives_ordinary_greedy_output_in_fewer_model_calls():
  model = small_model("gpt")  # llama: the draft-model test below
  prompts = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7], [1, 2, 3, 1, 2, 3, 1, 2], [40, 41, 42, 43]]  # left-padded batch
  want = G.generate(model, prompts, max_new_tokens=24)
  for draft_tokens, ngram in ((4, 3), (7, 1)):
    assert G.generate(model, prompts, max_new_tokens=24, speculate="lookup", draft_tokens=draft_tokens,
                      ngram=ngram) == want, (draft_tokens, ngram)
  eos = want[0][5]  # a row that stops early, the others later or not at all: identical cuts and fills
  assert (G.generate(model, prompts, max_new_tokens=24, eos_id=eos, speculate="lookup")
          == G.generate(model, prompts, max_new_tokens=24, eos_id=eos))
  # the drafts were used: fewer model calls than tokens
  args, kwargs = G._prepare(model, prompts[:1], 24, 0.0, 0, 1.0, 0, None)
  out, calls, accepted = speculative.generate_speculative(*args, **kwargs, draft_tokens=4, ngram=3)
  assert out.tolist() == want[:1]
  assert int(calls) < 24 and int(accepted) > 0 and int(calls) - 1 + int(accepted) >= 24 - 1


def _exact_next_two(model, prompt, temperature):
  """Exact marginals of new tokens 0, 1 and 2 under temperature sampling: [3, V] probabilities."""
  vocab = model.spec.vocab_size
  probs = lambda x: np.asarray(jax.nn.softmax(model(jnp.asarray(x))[:, -1] / temperature, axis=-1), np.float64)  # noqa: E731
  p0 = probs([prompt])[0]  # [V]
  p1 = probs([prompt + [t] for t in range(vocab)])  # [V, V]: row t0
  p2 = probs([prompt + [a, b] for a in range(vocab) for b in range(vocab)]).reshape(vocab, vocab, vocab)
  joint01 = p0[:, None] * p1
  return np.stack([p0, joint01.sum(0), (joint01[:, :, None] * p2).sum((0, 1))])


def test_sampled_lookup_is_distributed_as_the_model_and_a_wrong_rule_is_caught():
  model = small_model(vocab=6)
  prompt = [1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2]  # repetitive: most rounds have a draft to accept or reject
  exact = _exact_next_two(model, prompt, temperature=1.0)
  rows = 3000

  def marginals(**kw):
    args, kwargs = G._prepare(model, [prompt] * rows, 3, 1.0, 0, 1.0, 0, None)
    if kw:  # 3,000 rows share each round's advance, so mostly one token per round: the rule decides each of them
      out = speculative.generate_speculative(*args, **kwargs, **kw)[0]
    else:
      out, _ = G._generate_padded(*args, **kwargs)
    out = np.asarray(out)
    return np.stack([np.bincount(out[:, j], minlength=6) / rows for j in range(3)])

  def total_variation(p):
    return 0.5 * np.abs(p - exact).sum(1)

  ordinary = total_variation(marginals())
  speculated = total_variation(marginals(draft_tokens=2, ngram=2))
  assert ordinary.max() < 0.04 and speculated.max() < 0.04, (ordinary, speculated)
  # tokens 1 and 2 went through the acceptance rule; keeping every draft instead skews them toward the drafts
  always_keep = speculative.verify

  def keep_all(logits, drafts, settings, counters, draft_probs=None):
    accepted, tokens = always_keep(logits, drafts, settings, counters, draft_probs)
    k = drafts.shape[1]
    return jnp.full_like(accepted, k), tokens.at[:, :k].set(drafts)

  speculative.verify = keep_all
  try:
    jax.clear_caches()
    wrong = total_variation(marginals(draft_tokens=2, ngram=2))
  finally:
    speculative.verify = always_keep
    jax.clear_caches()
  assert wrong[1:].max() > 0.1, wrong


def test_a_draft_model_gives_greedy_output_identical_and_sampled_output_distributed_as_the_model():
  model = small_model("llama")
  prompts = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7], [1, 2, 3, 1, 2, 3, 1, 2], [40, 41, 42, 43]]
  want = G.generate(model, prompts, max_new_tokens=20)
  other = small_model("gpt", seed=7, layers=1)  # a different model: most drafts rejected
  assert G.generate(model, prompts, max_new_tokens=20, speculate="draft", draft_model=other, draft_tokens=3) == want
  # the model as its own draft: every greedy draft is kept, k + 1 tokens per target call
  args, kwargs = G._prepare(model, prompts, 20, 0.0, 0, 1.0, 0, None)
  draft_graphdef, draft_state = nnx.split(model)
  out, calls, _ = speculative.generate_speculative(*args, **kwargs, draft_tokens=4, draft_graphdef=draft_graphdef,
                                                   draft_state=draft_state)
  assert out.tolist() == want and int(calls) == 1 + 4  # prefill + ceil(19 / 5) rounds

  target, draft = small_model(vocab=6), small_model(vocab=6, seed=3, layers=1)
  prompt = [1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2]
  exact = _exact_next_two(target, prompt, temperature=1.0)
  rows = 3000
  args, kwargs = G._prepare(target, [prompt] * rows, 3, 1.0, 0, 1.0, 0, None)
  draft_graphdef, draft_state = nnx.split(draft)
  out = np.asarray(speculative.generate_speculative(*args, **kwargs, draft_tokens=2, draft_graphdef=draft_graphdef,
                                                    draft_state=draft_state)[0])
  got = np.stack([np.bincount(out[:, j], minlength=6) / rows for j in range(3)])
  assert (0.5 * np.abs(got - exact).sum(1)).max() < 0.04, got - exact
  # and the draft's own distribution is far from the model's, so the rule had work to do
  drafted = _exact_next_two(draft, prompt, temperature=1.0)
  assert (0.5 * np.abs(drafted - exact).sum(1)).max() > 0.1


def test_bad_speculation_settings_are_named():
  model = small_model()
  for kw, message in (({"speculate": "medusa"}, "speculate='medusa' must be one of"),
                      ({"speculate": "lookup", "draft_tokens": 0}, "draft_tokens=0 must be in"),
                      ({"speculate": "lookup", "ngram": 9}, "ngram=9 must be in"),
                      ({"speculate": "draft"}, "needs a draft model"),
                      ({"speculate": "draft", "draft_model": small_model(vocab=50)}, "vocabulary \\(50 tokens\\) differs")):
    with pytest.raises(ValueError, match=message):
      G.generate(model, [[1, 2]], max_new_tokens=4, **kw)


def test_the_benchmark_measures_lookup_on_the_validation_split_and_the_cli_speculates(tiny_run, tmp_path):
  from scripts import bench_decode

  workdir = tiny_run[0]
  rows = bench_decode.speculation_rows(workdir, prompts=2, prompt_len=24, new_tokens=16, draft_lengths=[2],
                                       ngram=3, repeats=1)
  assert [r["case"] for r in rows] == ["greedy", "lookup k=2"]
  assert all(r["identical_to_greedy"] and r["tokens_per_s"] > 0 for r in rows)
  assert rows[0]["model_calls_per_token"] == 1.0 and rows[1]["model_calls_per_token"] < 1.0  # drafts were kept
  out = subprocess.run([sys.executable, "-m", "infer.generate", f"--workdir={workdir}", "--prompt=def f(x):",
                        "--max_new_tokens=8", "--speculate=lookup", "--draft_tokens=3", "--offload=weights,kv"],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "model calls incl. prefill" in out.stdout  # (bad settings: test_bad_speculation_settings_are_named)
  assert "offloaded (weights,kv): {'pinned_host': " in out.stdout  # (outputs: tests/test_offload.py)


# -- the serving engine ------------------------------------------------------------------------------------------------


def _drive(engine, prompts, params):
  """Every request through the engine, two admitted at a time as room allows; returns outputs and decode steps."""
  outputs, owner, waiting, steps = {i: [] for i in range(len(prompts))}, {}, list(range(len(prompts))), 0
  while waiting or owner:
    while waiting and engine.can_insert(len(prompts[waiting[0]]), params[waiting[0]].max_tokens):
      i = waiting.pop(0)
      owner[engine.insert(prompts[i], params[i])] = i
    for slot in [s for s in owner if engine.is_prefilling(s)]:
      token = engine.prefill(slot)
      if token is not None:
        outputs[owner[slot]].append(token)
    produced = engine.generate()
    steps += bool(produced)
    for slot, tokens in produced.items():
      assert len(engine.logprobs[slot]) == len(tokens)
      outputs[owner[slot]].extend(tokens)
    for slot in list(owner):
      assert len(outputs[owner[slot]]) <= params[owner[slot]].max_tokens
      if len(outputs[owner[slot]]) == params[owner[slot]].max_tokens:
        engine.release(slot)
        del owner[slot]
  return outputs, steps


def test_the_engine_speculates_with_ordinary_outputs_and_returns_every_page():
  model = small_model("llama", max_len=64)
  draft = small_model("gpt", seed=7, layers=1, max_len=64)
  prompts = [[5, 6, 7, 8] * 3, [1, 2, 3, 4] * 3, [40, 41, 42, 43, 40, 41, 42, 43, 40, 41, 42, 43]]  # one length
  new = [20, 13, 30]
  want = G.generate(model, prompts, max_new_tokens=max(new))
  # (a draft that disagrees: the sampled case below)
  for speculate, kw in (("lookup", {}), ("draft", {"draft_model": model})):
    # 3 slots, but 6 usable pages hold 2 requests: admission waits, pages are reused
    engine = Engine(model, slots=3, page_size=16, num_pages=7, prefill_chunk=16, speculate=speculate,
                    draft_tokens=3, **kw)
    outputs, steps = _drive(engine, prompts, [SamplingParams(max_tokens=n) for n in new])
    for i, n in enumerate(new):
      assert outputs[i] == want[i][:n], (speculate, i)
    assert engine.free_pages == engine.num_pages - 1 and engine.active_slots == 0
    # every decoded token is a kept draft or a round's own token
    assert engine.speculative_rounds + engine.drafts_accepted == sum(n - 1 for n in new)
    if speculate == "lookup":  # repetitive prompts: some drafts kept
      assert engine.drafts_accepted > 0 and steps < sum(new), steps
    if kw.get("draft_model") is model:  # its own draft (its pages in step with the model's): every draft kept
      assert engine.acceptance_rate == 1.0

  # sampled: each request draws what batch-1 speculative `generate` draws with its seed, whatever else runs
  params = [SamplingParams(max_tokens=12, temperature=1.0, seed=11 + i) for i in range(3)]
  engine = Engine(model, slots=3, page_size=16, speculate="draft", draft_tokens=3, draft_model=draft)
  outputs, _ = _drive(engine, prompts, params)  # (lookup differs only in its drafts, checked greedy above)
  for i, prompt in enumerate(prompts):
    alone = G.generate(model, [prompt], max_new_tokens=12, temperature=1.0, seed=11 + i, speculate="draft",
                       draft_tokens=3, draft_model=draft)[0]
    assert outputs[i] == alone, i
  assert len({tuple(o) for o in outputs.values()}) == 3
  with pytest.raises(ValueError, match="draft_tokens=17 must be in"):
    Engine(model, speculate="lookup", draft_tokens=17)
