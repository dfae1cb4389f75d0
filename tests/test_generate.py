"""Generation: greedy parity with a full-forward reference, padding, sampling determinism, top-k/top-p, eos, limits."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import random_model
from infer import generate as G
from workdir import tokenizer as tokenizer_lib

VOCAB = 97
MAX_LEN = 32


@functools.lru_cache(maxsize=None)
def make_model(family="gpt"):
  """A random 2-layer, width-32 model with peaked logits (conftest.random_model)."""
  return random_model(family, VOCAB, MAX_LEN)


@nnx.jit
def _forward(model, x):
  return model(x)


def greedy_reference(model, prompt, n):
  """Re-runs the full forward over the whole sequence at every step and takes the argmax of the last real position.

  The sequence is right-padded to a fixed width (causal attention makes the padding invisible to earlier positions) so
  one compilation serves every step."""
  seq = list(prompt)
  for _ in range(n):
    x = np.zeros((1, MAX_LEN), np.int32)
    x[0, :len(seq)] = seq
    logits = np.asarray(_forward(model, jnp.asarray(x)))[0, len(seq) - 1]
    top2 = np.sort(logits)[-2:]
    assert top2[1] - top2[0] > 1e-3, "near-tie in the reference; pick another prompt"
    seq.append(int(np.argmax(logits)))
  return seq[len(prompt):]


def prompt(seed, n):
  return np.random.default_rng(seed).integers(1, VOCAB, n).tolist()


# Most tests share one request shape (3 rows, padded prompt 16, 16 new tokens = exactly max_len) so the jitted
# generate compiles once per sampling setting.
PROMPTS = [prompt(1, 16), prompt(2, 5), prompt(3, 1)]
N = 16


def test_greedy_single_prompt_matches_full_forward_reference():
  model = make_model("gpt")
  p = prompt(0, 7)
  assert G.generate(model, [p], max_new_tokens=10) == [greedy_reference(model, p, 10)]


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_greedy_batch_of_different_lengths_matches_each_unpadded_reference(family):
  model = make_model(family)
  out = G.generate(model, PROMPTS, max_new_tokens=N)
  assert out == [greedy_reference(model, p, N) for p in PROMPTS]


def test_sampling_is_deterministic_per_seed_and_varies_across_seeds():
  model = make_model("gpt")
  kw = dict(max_new_tokens=N, temperature=1.0)
  a = G.generate(model, PROMPTS, seed=1, **kw)
  assert a == G.generate(model, PROMPTS, seed=1, **kw)
  b = G.generate(model, PROMPTS, seed=2, **kw)
  assert a != b
  assert all(len(r) == N and all(0 <= t < VOCAB for t in r) for r in a + b)
  assert a != G.generate(model, PROMPTS, max_new_tokens=N), "temperature 1 should not reproduce greedy"


def test_top_k_one_equals_greedy():
  model = make_model("gpt")
  sampled = G.generate(model, PROMPTS, max_new_tokens=N, temperature=1.5, top_k=1, seed=3)
  assert sampled == G.generate(model, PROMPTS, max_new_tokens=N)


def test_eos_stops_its_row_and_leaves_other_rows_alone():
  model = make_model("gpt")
  greedy = G.generate(model, PROMPTS, max_new_tokens=N)
  eos = greedy[0][0]
  out = G.generate(model, PROMPTS, max_new_tokens=N, eos_id=eos)
  assert out[0] == [eos]
  for row, full in zip(out[1:], greedy[1:]):
    assert row == (full[:full.index(eos) + 1] if eos in full else full)
  # When every row hits eos at once the loop stops early and each row is exactly [eos].
  assert G.generate(model, [PROMPTS[0]] * 3, max_new_tokens=N, eos_id=eos) == [[eos]] * 3


def test_requests_longer_than_max_len_raise_value_error():
  model = make_model("gpt")
  assert len(PROMPTS[0]) + N == MAX_LEN  # the shared shape (used above) fills max_len exactly, which is allowed
  with pytest.raises(ValueError, match=r"17.*16.*33.*max_len=32"):
    G.generate(model, [prompt(11, 17), prompt(12, 3)], max_new_tokens=N)
  with pytest.raises(ValueError):
    G.generate(model, [[]], max_new_tokens=4)


def test_generate_text_uses_eot_convention():
  tokenizers = pytest.importorskip("tokenizers")
  from tokenizers import models, pre_tokenizers, decoders
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[tokenizer_lib.EOT], show_progress=False,
                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:80])
  tok.train_from_iterator(["def fib(n): return n"] * 4, trainer=trainer)
  assert tok.get_vocab_size() <= VOCAB and tokenizer_lib.eot_id(tok) == 0
  model = make_model("gpt")
  ids = tokenizer_lib.encode_document(tok, "def fib(")
  assert ids[0] == 0 and len(ids) > 1
  texts = G.generate_text(model, tok, ["def fib(", "n"], max_new_tokens=6, temperature=0.0, top_k=0, top_p=1.0,
                          seed=0)
  rows = G.generate(model, [ids, tokenizer_lib.encode_document(tok, "n")], max_new_tokens=6, eos_id=0)
  assert texts == [tok.decode([t for t in r if t != 0], skip_special_tokens=False) for r in rows]
  assert all(isinstance(t, str) for t in texts)


def test_profile_decode_script_reports_thunks_by_kind():
  """scripts/profile_decode.py reads jax.profiler's trace (a private API that moves): the tiny preset's decode
  must come out with a per-token time, a thunk count and the dots among the kinds."""
  import os
  import re
  import subprocess
  import sys

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run([sys.executable, "-m", "scripts.profile_decode", "--shape=tiny", "--new_tokens=8",
                         "--prompt_len=4"], cwd=root, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert re.search(r"ms per new token", done.stdout) and re.search(r"thunks per step [1-9]", done.stdout)
  assert re.search(r"ms/step\s+\S*dot", done.stdout), done.stdout
