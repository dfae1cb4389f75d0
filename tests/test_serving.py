"""Serving: the paged decode kernel, the continuous-batching engine and scheduler, and the OpenAI-compatible server."""

import asyncio
import json
import threading
import time

import aiohttp
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infer import generate, loading, serve
from infer import engine as engine_lib
from infer.engine import Engine
from infer.sampling import SamplingParams
from infer.scheduler import QueueFull, Scheduler
from infer.server import BackgroundServer, Server
from model.kernels import paged_attention as pa
from scripts import serve_load
from workdir import tokenizer as tokenizer_lib


# -- paged decode kernel -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
def test_paged_decode_kernel_matches_reference_for_ragged_rows(dtype, tol):
  rng = np.random.default_rng(0)
  b, h, kv, d, page, num_pages, max_pages = 4, 8, 2, 32, 16, 24, 5
  ks = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(ks[0], (b, h, d), dtype)
  k_pages = jax.random.normal(ks[1], (num_pages, page, kv, d), dtype)
  v_pages = jax.random.normal(ks[2], (num_pages, page, kv, d), dtype)
  table = rng.permutation(np.arange(1, num_pages))[:b * max_pages].reshape(b, max_pages).astype(np.int32)
  lengths = np.array([1, 37, 80, 0], np.int32)  # one slot, partial pages, all pages, an empty row
  got = pa.paged_decode_attention(q, k_pages, v_pages, jnp.asarray(table), jnp.asarray(lengths))
  want = pa.reference_paged_decode_attention(q, k_pages, v_pages, jnp.asarray(table), jnp.asarray(lengths))
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)
  assert np.all(np.asarray(got[3]) == 0)  # nothing to attend to: zeros
  # Pages past a row's length are never read: poisoning them changes nothing.
  poisoned_k = k_pages.at[table[1, 3:]].set(jnp.nan)
  again = pa.paged_decode_attention(q, poisoned_k, v_pages, jnp.asarray(table), jnp.asarray(lengths))
  np.testing.assert_array_equal(np.asarray(again[1]), np.asarray(got[1]))


def test_paged_decode_kernel_rejects_bad_page_sizes():
  q = jnp.zeros((1, 2, 16))
  pages = jnp.zeros((4, 24, 2, 16))
  with pytest.raises(ValueError, match="page_size=24"):
    pa.paged_decode_attention(q, pages, pages, jnp.zeros((1, 2), jnp.int32), jnp.ones((1,), jnp.int32))


# -- engine ------------------------------------------------------------------------------------------------------------


def _prompts(vocab, lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(1, vocab, size=n).tolist() for n in lengths]


def _drive(engine, prompts, params_list):
  """Runs requests through the engine as the scheduler does: admission in order while room, chunked prefill, decode;
  requests the engine preempts go back to the front of the queue and are re-inserted with their output so far."""
  outputs, owner, waiting = {i: [] for i in range(len(prompts))}, {}, list(range(len(prompts)))
  max_active = 0
  while waiting or owner:
    while waiting and engine.can_insert(len(prompts[waiting[0]]), params_list[waiting[0]].max_tokens,
                                        len(outputs[waiting[0]])):
      i = waiting.pop(0)
      owner[engine.insert(prompts[i], params_list[i], resume=outputs[i])] = i
    max_active = max(max_active, engine.active_slots)
    if engine.mixed_batches:  # prefill chunks and decode tokens in one call
      produced = engine.step()
    else:
      for slot in [s for s in owner if engine.is_prefilling(s)]:
        token = engine.prefill(slot)
        if token is not None:
          outputs[owner[slot]].append(token)
      produced = engine.generate()
    for slot in reversed(engine.preempted):
      waiting.insert(0, owner.pop(slot))
    for slot, tokens in produced.items():
      outputs[owner[slot]].extend(tokens)
    for slot in list(owner):
      if len(outputs[owner[slot]]) >= params_list[owner[slot]].max_tokens:
        engine.release(slot)
        del owner[slot]
  return outputs, max_active


@pytest.mark.parametrize("attention_impl,mixed_batches", [("xla", False), ("pallas", False), ("pallas", True)])
def test_engine_greedy_under_load_equals_generate_alone_and_frees_every_page(tiny_run, attention_impl,
                                                                             mixed_batches):
  _, model, _, _ = loading.load_trained(tiny_run[0], attention_impl=attention_impl)
  prompts = _prompts(model.spec.vocab_size, [5, 33, 12, 40, 1, 20, 9])
  new = [8, 12, 5, 20, 16, 3, 10]
  engine = Engine(model, slots=3, page_size=16, num_pages=9, prefill_chunk=16,  # 8 usable pages: admission waits
                  mixed_batches=mixed_batches)
  outputs, max_active = _drive(engine, prompts, [SamplingParams(max_tokens=n) for n in new])
  assert max_active == 3
  # generate's left-padded batch equals each prompt alone (test_generate), and greedy continuations are prefixes
  # of longer ones, so one batched call is the reference for every request.
  want = generate.generate(model, prompts, max_new_tokens=max(new))
  for i, n in enumerate(new):
    assert outputs[i] == want[i][:n], f"request {i}"
  assert engine.free_pages == engine.num_pages - 1 and engine.active_slots == 0


def test_prefix_caching_shares_pages_exactly_evicts_the_least_recently_used_and_returns_every_page(tiny_run):
  _, model, _, _ = loading.load_trained(tiny_run[0])
  system = _prompts(model.spec.vocab_size, [24], seed=5)[0]  # one full page of 16 shared, 8 tokens in the second
  tails = _prompts(model.spec.vocab_size, [3, 20, 1, 9], seed=6)
  prompts = [system + t for t in tails] + [system + tails[1]] + _prompts(model.spec.vocab_size, [20], seed=7)
  new = [6, 4, 8, 5, 4, 6]
  want = generate.generate(model, prompts, max_new_tokens=max(new))
  # one slot: each request finishes its prefill before the next arrives; 6 usable pages
  engine = Engine(model, slots=1, page_size=16, num_pages=7, prefill_chunk=16, prefix_caching=True)
  outputs, _ = _drive(engine, prompts, [SamplingParams(max_tokens=n) for n in new])
  for i, n in enumerate(new):
    assert outputs[i] == want[i][:n], f"request {i}"
  # requests 1-3 reuse the system prompt's full page (16 tokens each); the repeated prompt (44 tokens) its first
  # two pages (the second cached by request 1); the unrelated one nothing
  assert engine.prefix_hit_tokens == 3 * 16 + 32, engine.prefix_hit_tokens
  assert engine.prefix_hit_rate == pytest.approx(engine.prefix_hit_tokens / sum(map(len, prompts)))
  assert engine.active_slots == 0 and engine.free_pages == engine.num_pages - 1  # every page free or evictable
  assert engine.cached_pages == 4  # the system page, the second pages of requests 1 and 3, the unrelated prompt's
  # A 50-token request needs 4 pages with 2 free: it evicts the two least recently used cached pages, request 3's
  # and request 1's second pages (the system page and the unrelated page were released later), so the repeated
  # prompt now finds only the system page, and still decodes exactly.
  hits = engine.prefix_hit_tokens
  more, _ = _drive(engine, [_prompts(model.spec.vocab_size, [50], seed=8)[0], prompts[1]],
                   [SamplingParams(max_tokens=10), SamplingParams(max_tokens=4)])
  assert more[1] == want[1][:4]
  assert engine.prefix_hit_tokens == hits + 16
  assert engine.free_pages == engine.num_pages - 1


def test_on_demand_pages_admit_more_requests_and_preemption_changes_no_output(tiny_run):
  _, model, _, _ = loading.load_trained(tiny_run[0])
  prompts = _prompts(model.spec.vocab_size, [5, 12, 3, 9, 1, 7, 14, 6])  # short prompts, long outputs
  new = [40, 30, 45, 20, 50, 35, 25, 40]
  want = generate.generate(model, prompts, max_new_tokens=max(new))
  greedy = [SamplingParams(max_tokens=n) for n in new]
  sampled = [SamplingParams(max_tokens=n, temperature=1.0, seed=i) for i, n in enumerate(new)]
  runs = {}
  for allocation, speculate in (("reserve", "none"), ("on_demand", "none"), ("on_demand", "lookup"),
                                ("on_demand", "mixed")):
    for name, params in (("greedy", greedy), ("sampled", sampled)):
      if speculate == "lookup" and name == "sampled":
        continue
      # 4 slots over 8 usable pages: reserving admits 2 requests at a time (3-4 pages each), on demand 4 (one page
      # each, plus headroom), which preempt each other as they grow
      engine = Engine(model, slots=4, page_size=16, num_pages=9, prefill_chunk=16, page_allocation=allocation,
                      speculate=speculate if speculate != "mixed" else "none", draft_tokens=3,
                      mixed_batches=speculate == "mixed")
      outputs, max_active = _drive(engine, prompts, params)
      assert engine.active_slots == 0 and engine.free_pages == engine.num_pages - 1 and engine.used_pages == 0
      runs[allocation, speculate, name] = outputs, max_active, engine.preemptions
  for key, (outputs, _, _) in runs.items():
    if key[2] == "greedy":
      assert [outputs[i] == want[i][:n] for i, n in enumerate(new)] == [True] * len(new), key
  assert runs["on_demand", "none", "sampled"][0] == runs["reserve", "none", "sampled"][0]  # same keys, same tokens
  assert runs["on_demand", "mixed", "sampled"][0] == runs["reserve", "none", "sampled"][0]
  assert runs["reserve", "none", "greedy"][2] == 0  # reserving never preempts
  assert all(runs["on_demand", kind, "greedy"][2] > 0 for kind in ("none", "lookup", "mixed"))
  assert runs["on_demand", "none", "greedy"][1] > runs["reserve", "none", "greedy"][1]
  with pytest.raises(ValueError, match="page_allocation='lazy' must be one of"):
    Engine(model, page_allocation="lazy")


def test_mixed_steps_prefill_several_prompts_beside_the_decodes_within_the_token_budget(tiny_run):
  _, model, _, _ = loading.load_trained(tiny_run[0])
  prompts = _prompts(model.spec.vocab_size, [10, 7, 50, 20, 5], seed=3)
  want = generate.generate(model, prompts, max_new_tokens=6)
  engine = Engine(model, slots=5, page_size=16, prefill_chunk=64, mixed_batches=True)
  assert (engine.prefill_row, engine.prefill_rows) == (32, 2)  # the step's budget: two rows of 32 prompt tokens
  assert Engine(model, speculate="lookup", mixed_batches=True).mixed_batches is False  # speculation: own calls
  engine.warmup()
  compiled = engine_lib._mixed_step._cache_size()
  params = SamplingParams(max_tokens=6)
  slots = [engine.insert(p, params) for p in prompts[:2]]
  assert sorted(engine.step()) == slots  # both short prompts prefilled in one call: each has its first token
  slots += [engine.insert(p, params) for p in prompts[2:]]
  # the 50-token prompt fills both rows (32 + 18 tokens) beside the two decodes; prompts 3 and 4 wait
  assert sorted(engine.step()) == sorted(slots[:3])
  assert engine._active[slots[3]].prefilled == engine._active[slots[4]].prefilled == 0
  assert sorted(engine.step()) == sorted(slots)  # a row each for prompts 3 and 4, beside three decodes
  outputs = {}
  while engine.active_slots:
    engine.step()
    for slot in [s for s in engine._active if engine._active[s].generated >= 6]:
      outputs[slots.index(slot)] = list(engine._active[slot].output)
      engine.release(slot)
  assert outputs == {i: want[i][:6] for i in range(5)}
  assert engine.free_pages == engine.num_pages - 1
  assert engine_lib._mixed_step._cache_size() == compiled  # the warm-up compiled every shape the steps took


@pytest.mark.parametrize("kind", ["int8_weight", "moe", "gptq4"])
def test_engine_serves_int8_moe_and_packed_checkpoints_like_generate(kind, tiny_run, tiny_moe_run, tmp_path):
  from configs import compress as compress_config
  from infer.compress import pipeline as compress
  from infer.quantize import quantize_workdir

  if kind == "moe":
    workdir = tiny_moe_run[0]
  elif kind == "gptq4":  # 4-bit codes served as stored (model.quant=packed)
    workdir = str(tmp_path / kind)
    config, model, tokenizer, step = loading.load_trained(tiny_run[0])
    c = compress_config.get_config()
    c.update(method="gptq", bits=4, group_size=32, calibration_samples=4, calibration_len=32)
    compress.compress_workdir(config, model, tokenizer, step, c, source_workdir=tiny_run[0], out=workdir)
  else:
    workdir = str(tmp_path / kind)
    quantize_workdir(tiny_run[0], workdir, kind, calibration_batches=1)
  _, model, _, _ = loading.load_trained(workdir)
  assert model.spec.quant == {"moe": "none", "gptq4": "packed"}.get(kind, kind)
  prompts = _prompts(model.spec.vocab_size, [7, 21, 3], seed=1)
  engine = Engine(model, slots=2, prefill_chunk=16)
  outputs, _ = _drive(engine, prompts, [SamplingParams(max_tokens=9)] * 3)
  want = generate.generate(model, prompts, max_new_tokens=9)
  for i in range(len(prompts)):
    assert outputs[i] == want[i], f"request {i}"
  assert engine.free_pages == engine.num_pages - 1


def test_engine_seeded_sampling_does_not_depend_on_the_rest_of_the_batch(tiny_run):
  _, model, _, _ = loading.load_trained(tiny_run[0])
  prompts = _prompts(model.spec.vocab_size, [6, 15, 3])
  sampled = SamplingParams(max_tokens=10, temperature=1.0, top_k=20, top_p=0.9, seed=7)
  alone, _ = _drive(Engine(model, slots=1), prompts[:1], [sampled])
  mixed, _ = _drive(Engine(model, slots=3), prompts, [sampled, SamplingParams(max_tokens=10),
                                                       SamplingParams(max_tokens=4, temperature=0.7, seed=3)])
  assert mixed[0] == alone[0]
  other_seed, _ = _drive(Engine(model, slots=1), prompts[:1], [SamplingParams(**{**sampled.__dict__, "seed": 8})])
  assert other_seed[0] != alone[0]


def test_engine_refuses_requests_that_can_never_fit(tiny_run):
  _, model, _, _ = loading.load_trained(tiny_run[0])
  engine = Engine(model, slots=2, page_size=16, num_pages=3)
  with pytest.raises(ValueError, match="exceeds the model's context"):
    engine.insert([1] * 60, SamplingParams(max_tokens=10))
  with pytest.raises(ValueError, match="needs 3 pages but the pool has 2"):
    engine.insert([1] * 40, SamplingParams(max_tokens=2))
  with pytest.raises(ValueError, match="page_size=20"):
    Engine(model, page_size=20)


# -- scheduler ---------------------------------------------------------------------------------------------------------


def _iteration(engine) -> str:
  """The engine method the scheduler calls once per iteration (faults are injected there)."""
  return "step" if engine.mixed_batches else "generate"


def _scheduler(model, tokenizer, **kw):
  return Scheduler(Engine(model, slots=kw.pop("slots", 2)), lambda ids: tokenizer_lib.decode(tokenizer, ids), **kw)


def test_cancelled_and_finished_requests_return_all_pages_and_the_queue_is_bounded(tiny_run):
  _, model, tokenizer, _ = loading.load_trained(tiny_run[0])
  sched = _scheduler(model, tokenizer, max_queue=3)  # not started: stepped by hand
  events = []
  reqs = [sched.submit([1, 2, 3], SamplingParams(max_tokens=30), events.append) for _ in range(3)]
  with pytest.raises(QueueFull):
    sched.submit([1], SamplingParams(max_tokens=2), events.append)
  sched._admit()
  sched.step()
  assert sched.engine.active_slots == 2 and sched.queue_length == 1
  reqs[0].cancel()
  reqs[2].cancel()  # still waiting
  sched._end_cancelled_or_late()
  assert [r.finish_reason for r in reqs] == ["cancelled", None, "cancelled"]
  while reqs[1].finish_reason is None:
    sched.step()
  assert reqs[1].finish_reason == "length" and len(reqs[1].output_ids) == 30
  assert sched.engine.free_pages == sched.engine.num_pages - 1 and sched.engine.active_slots == 0


def test_stop_strings_cut_the_text_and_end_the_request(tiny_run):
  _, model, tokenizer, _ = loading.load_trained(tiny_run[0])
  prompt = tokenizer_lib.encode_document(tokenizer, "def ")
  free_text = tokenizer_lib.decode(tokenizer, generate.generate(model, [prompt], max_new_tokens=20)[0])
  stop = free_text[3:6]
  assert stop and stop in free_text
  sched = _scheduler(model, tokenizer).start()
  done = threading.Event()
  req = sched.submit(prompt, SamplingParams(max_tokens=20, stop_strings=(stop,)),
                     lambda e: e.finish_reason and done.set())
  assert done.wait(60)
  sched.stop()
  assert req.finish_reason == "stop" and req.text == free_text[:free_text.find(stop)]


# -- HTTP server -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_run):
  # Separate prefill calls here: with mixed batches, XLA segfaulted compiling an engine step in this fixture in two
  # full CI runs (never in this file alone); mixed batches are tested on the engine and through the CLI server.
  srv = serve.build(tiny_run[0], slots=4, max_queue=32, mixed_batches=False)
  with BackgroundServer(srv) as bg:
    yield srv, bg
  srv.scheduler.stop()


async def _post(session, url, body, raw=None, headers=None):
  return (await _post_with_headers(session, url, body, raw, headers))[:2]


async def _post_with_headers(session, url, body, raw=None, headers=None):
  data = raw if raw is not None else json.dumps(body)
  async with session.post(url + "/v1/completions", data=data,
                          headers=headers or {"Content-Type": "application/json"}) as r:
    return r.status, await r.text(), r.headers


def test_streaming_returns_the_same_text_as_non_streaming(server):
  srv, bg = server

  async def go():
    async with aiohttp.ClientSession() as s:
      body = {"prompt": "import ", "max_tokens": 20, "temperature": 0, "n": 2}
      status, text = await _post(s, bg.url, body)
      status_s, stream = await _post(s, bg.url, {**body, "stream": True, "stream_options": {"include_usage": True}})
      return status, json.loads(text), status_s, stream

  status, whole, status_s, stream = asyncio.run(go())
  assert status == status_s == 200
  events = [line[6:] for line in stream.split("\n\n") if line.startswith("data: ")]
  assert events[-1] == "[DONE]"
  chunks = [json.loads(e) for e in events[:-1]]
  texts = ["", ""]
  for c in chunks[:-1]:
    (choice,) = c["choices"]
    texts[choice["index"]] += choice["text"]
  assert texts == [c["text"] for c in whole["choices"]]
  assert whole["usage"] == chunks[-1]["usage"]
  alone = generate.generate(srv.scheduler.engine.model, [tokenizer_lib.encode_document(srv.tokenizer, "import ")],
                            max_new_tokens=20, eos_id=srv.eot)[0]
  assert whole["usage"]["completion_tokens"] == 2 * len(alone)  # greedy: both choices are the prompt's continuation
  assert whole["choices"][0]["text"] == tokenizer_lib.decode_completion(srv.tokenizer, alone)


def test_two_hundred_concurrent_requests_all_complete_or_get_429(server):
  srv, bg = server

  async def go():
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
      bodies = [{"prompt": f"x = {i}", "max_tokens": 1 + i % 5, "temperature": 0} for i in range(200)]
      return await asyncio.gather(*(_post_with_headers(s, bg.url, b) for b in bodies))

  results = asyncio.run(go())
  codes = [status for status, _, _ in results]
  assert set(codes) <= {200, 429} and codes.count(200) >= 32
  assert all(headers.get("Retry-After") == "1" for status, _, headers in results if status == 429)
  for (status, text, _), i in zip(results, range(200)):
    body = json.loads(text)
    if status == 200:
      assert body["usage"]["completion_tokens"] <= 1 + i % 5 and body["choices"][0]["finish_reason"] in ("stop",
                                                                                                          "length")
    else:
      assert body["error"]["type"] == "rate_limit_exceeded"
  engine = srv.scheduler.engine
  assert engine.active_slots == 0 and engine.free_pages == engine.num_pages - 1


BAD = [
    ("not json", None, "{not json"),
    ("body not an object", [1, 2], None),
    ("missing prompt", {"max_tokens": 3}, None),
    ("negative max_tokens", {"prompt": "a", "max_tokens": -1}, None),
    ("huge max_tokens", {"prompt": "a", "max_tokens": 10**9}, None),
    ("string max_tokens", {"prompt": "a", "max_tokens": "3"}, None),
    ("bool n", {"prompt": "a", "n": True}, None),
    ("n too big", {"prompt": "a", "n": 1000}, None),
    ("temperature type", {"prompt": "a", "temperature": "hot"}, None),
    ("temperature range", {"prompt": "a", "temperature": -1}, None),
    ("top_p zero", {"prompt": "a", "top_p": 0}, None),
    ("stream not bool", {"prompt": "a", "stream": "yes"}, None),
    ("unknown field", {"prompt": "a", "frobnicate": 1}, None),
    ("prompt type", {"prompt": 5}, None),
    ("token out of vocab", {"prompt": [1, 10**7]}, None),
    ("empty token list", {"prompt": []}, None),
    ("stop list too long", {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, None),
    ("prompt too long", {"prompt": "word " * 500, "max_tokens": 4}, None),
    ("unsupported echo", {"prompt": "a", "echo": True}, None),
    ("deeply nested", None, "[" * 100_000 + "]" * 100_000),
    ("number too long to parse", None, '{"prompt": "a", "max_tokens": ' + "9" * 5000 + "}"),
    ("not UTF-8", None, b'{"prompt": "\xff\xfe"}'),
    ("NaN temperature", None, '{"prompt": "a", "temperature": NaN}'),
    ("infinite top_p", None, '{"prompt": "a", "top_p": 1e999}'),
    ("stop string too long", {"prompt": "a", "stop": "x" * 300}, None),
    ("too many prompts", {"prompt": ["a"] * 65}, None),
    ("more completions than the queue holds", {"prompt": ["a"] * 5, "n": 8}, None),  # the fixture's queue is 32
]


def test_malformed_requests_get_400_and_the_server_keeps_serving(server):
  _, bg = server

  async def go():
    async with aiohttp.ClientSession() as s:
      out = [await _post(s, bg.url, body, raw) for _, body, raw in BAD]
      return out, await _post(s, bg.url, {"prompt": "ok", "max_tokens": 2})

  results, after = asyncio.run(go())
  for (name, _, _), (status, text) in zip(BAD, results):
    assert status == 400, name
    assert json.loads(text)["error"]["type"] == "invalid_request_error", name
  assert after[0] == 200


def test_oversized_bodies_wrong_content_types_and_api_keys_get_json_errors(server):
  srv, bg = server
  keyed = Server(srv.scheduler, srv.tokenizer, srv.model_id, srv.metrics, api_key="s3cret")

  async def go(url, keyed_url):
    async with aiohttp.ClientSession() as s:
      big = await _post(s, url, {"prompt": "a" * (5 * 2**20)})
      form = await _post(s, url, None, raw="prompt=a", headers={"Content-Type": "application/x-www-form-urlencoded"})
      missing = await _post(s, keyed_url, {"prompt": "a", "max_tokens": 1})
      wrong = await _post(s, keyed_url, {"prompt": "a", "max_tokens": 1},
                          headers={"Content-Type": "application/json", "Authorization": "Bearer nope"})
      right = await _post(s, keyed_url, {"prompt": "a", "max_tokens": 1},
                          headers={"Content-Type": "application/json", "Authorization": "Bearer s3cret"})
      async with s.get(keyed_url + "/health") as r:
        health = r.status
      return big, form, missing, wrong, right, health, await _post(s, url, {"prompt": "ok", "max_tokens": 2})

  with BackgroundServer(keyed) as keyed_bg:
    big, form, missing, wrong, right, health, after = asyncio.run(go(bg.url, keyed_bg.url))
  for (status, text), want in ((big, 413), (form, 415), (missing, 401), (wrong, 401)):
    assert status == want and set(json.loads(text)["error"]) == {"message", "type", "param", "code"}, (status, text)
  assert json.loads(missing[1])["error"]["code"] == "invalid_api_key"
  assert right[0] == 200 and health == 200 and after[0] == 200


def test_requests_without_a_seed_get_fresh_randomness(server):
  _, bg = server
  body = {"prompt": "def", "max_tokens": 12, "temperature": 2.0, "ignore_eos": True}

  async def go():
    async with aiohttp.ClientSession() as s:
      unseeded = [await _post(s, bg.url, body) for _ in range(3)]
      seeded = [await _post(s, bg.url, {**body, "seed": 7}) for _ in range(2)]
      return unseeded, seeded

  unseeded, seeded = asyncio.run(go())
  texts = [json.loads(t)["choices"][0]["text"] for _, t in unseeded]
  assert len(set(texts)) > 1, texts
  assert len({json.loads(t)["choices"][0]["text"] for _, t in seeded}) == 1


def test_an_engine_failure_fails_its_requests_with_500_and_the_engine_recovers(server, monkeypatch):
  srv, bg = server
  engine = srv.scheduler.engine
  real_generate = getattr(engine, _iteration(engine))
  calls = {"n": 0}

  def fails_once():
    calls["n"] += 1
    if calls["n"] == 1:
      raise RuntimeError("injected device fault")
    return real_generate()

  monkeypatch.setattr(engine, _iteration(engine), fails_once)

  async def go():
    async with aiohttp.ClientSession() as s:
      failed = await _post(s, bg.url, {"prompt": "a", "max_tokens": 4, "ignore_eos": True})
      after = await _post(s, bg.url, {"prompt": "a", "max_tokens": 4, "ignore_eos": True})
      async with s.get(bg.url + "/health") as r:
        return failed, after, r.status

  failed, after, health = asyncio.run(go())
  assert failed[0] == 500 and json.loads(failed[1])["error"]["type"] == "server_error", failed
  assert "injected device fault" in json.loads(failed[1])["error"]["message"]
  assert after[0] == 200 and json.loads(after[1])["usage"]["completion_tokens"] == 4 and health == 200
  assert engine.active_slots == 0 and engine.free_pages == engine.num_pages - 1


def test_health_reports_a_stuck_engine(server, monkeypatch):
  import urllib.error
  import urllib.request

  srv, bg = server
  engine = srv.scheduler.engine
  real_generate, release = getattr(engine, _iteration(engine)), threading.Event()
  monkeypatch.setattr(engine, _iteration(engine), lambda: (release.wait(10), real_generate())[1])
  monkeypatch.setattr(srv, "stuck_after_s", 0.3)

  async def one():
    async with aiohttp.ClientSession() as s:
      return await _post(s, bg.url, {"prompt": "a", "max_tokens": 2})

  result = {}
  worker = threading.Thread(target=lambda: result.update(done=asyncio.run(one())))
  worker.start()
  try:
    for _ in range(60):
      time.sleep(0.1)
      try:
        urllib.request.urlopen(bg.url + "/health")
      except urllib.error.HTTPError as e:
        code, body = e.code, json.loads(e.read())
        break
    else:
      pytest.fail("/health never reported the stuck engine")
    assert code == 503 and body["status"] == "stuck" and body["in_flight"] == 1
  finally:
    release.set()
    worker.join(30)
  assert result["done"][0] == 200
  assert json.loads(urllib.request.urlopen(bg.url + "/health").read()) == {"status": "ok"}


def test_queue_and_request_timeouts_answer_503_and_504_and_free_the_slots(server, monkeypatch):
  srv, bg = server
  sched, engine = srv.scheduler, srv.scheduler.engine
  body = {"prompt": "a", "max_tokens": 50, "ignore_eos": True}

  async def five(n=5):
    async with aiohttp.ClientSession() as s:
      return await asyncio.gather(*[_post_with_headers(s, bg.url, body) for _ in range(n)])

  assert [r[0] for r in asyncio.run(five(4))] == [200] * 4  # compiled and warm before the clock matters
  real_generate = getattr(engine, _iteration(engine))
  monkeypatch.setattr(engine, _iteration(engine), lambda: (time.sleep(0.1), real_generate())[1])  # >= 100 ms per token
  monkeypatch.setattr(sched, "request_timeout", 2.0)
  monkeypatch.setattr(sched, "queue_timeout", 1.0)
  results = asyncio.run(five())
  # four slots: four requests run past the 2 s request timeout (50 tokens take >= 5 s); the fifth waits in the
  # queue past the 1 s queue timeout
  assert sorted(status for status, _, _ in results) == [503, 504, 504, 504, 504]
  for status, text, headers in results:
    error = json.loads(text)["error"]
    assert error["code"] == {503: "queue_timeout", 504: "timeout"}[status] and "timeout is" in error["message"]
    assert (status == 503) == ("Retry-After" in headers)

  async def streamed():
    async with aiohttp.ClientSession() as s:
      async with s.post(bg.url + "/v1/completions", json={**body, "stream": True}) as r:
        return r.status, [json.loads(line[6:]) for line in (await r.text()).split("\n\n") if line.startswith("data: {")]

  status, events = asyncio.run(streamed())
  assert status == 200 and events[-1]["error"]["code"] == "timeout"  # the stream's last event says why it ended
  for _ in range(50):
    if engine.active_slots == 0:
      break
    time.sleep(0.1)
  assert engine.active_slots == 0 and engine.free_pages == engine.num_pages - 1


def test_scheduler_refuses_negative_timeouts(tiny_run):
  _, model, tokenizer, _ = loading.load_trained(tiny_run[0])
  with pytest.raises(ValueError, match="request_timeout=-1 must be >= 0 seconds"):
    _scheduler(model, tokenizer, request_timeout=-1)


def test_openai_client_works_against_the_server(server):
  import openai

  srv, bg = server
  client = openai.OpenAI(base_url=bg.url + "/v1", api_key="unused", max_retries=0)
  assert [m.id for m in client.models.list().data] == [srv.model_id]
  completion = client.completions.create(model=srv.model_id, prompt="def ", max_tokens=8, temperature=0)
  want = generate.generate_text(srv.scheduler.engine.model, srv.tokenizer, ["def "], max_new_tokens=8)[0]
  assert completion.choices[0].text == want
  streamed = "".join(c.choices[0].text for c in client.completions.create(
      model=srv.model_id, prompt="def ", max_tokens=8, temperature=0, stream=True) if c.choices)
  assert streamed == want
  with pytest.raises(openai.BadRequestError):
    client.completions.create(model=srv.model_id, prompt="a", max_tokens=-5)


def test_chat_completions_render_the_template_and_work_with_the_openai_client(server):
  import openai

  srv, bg = server
  client = openai.OpenAI(base_url=bg.url + "/v1", api_key="unused", max_retries=0)
  messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "a loop"}]
  # the reference: the default template's rendering with the generation prompt, continued greedily to its EOT
  text = srv.chat_template.render(messages, add_generation_prompt=True)
  assert text == "<|endoftext|><|system|>\nYou write Python.<|endoftext|><|user|>\na loop<|endoftext|><|assistant|>\n"
  prompt = tokenizer_lib.encode(srv.tokenizer, text)
  alone = generate.generate(srv.scheduler.engine.model, [prompt], max_new_tokens=12, eos_id=srv.eot)[0]
  want = tokenizer_lib.decode_completion(srv.tokenizer, alone)
  reply = client.chat.completions.create(model=srv.model_id, messages=messages, max_tokens=12, temperature=0, n=2,
                                         seed=3)
  assert reply.object == "chat.completion" and [c.message.role for c in reply.choices] == ["assistant"] * 2
  assert [c.message.content for c in reply.choices] == [want, want]
  assert reply.usage.prompt_tokens == 2 * len(prompt) and reply.usage.completion_tokens == 2 * len(alone)
  chunks = list(client.chat.completions.create(model=srv.model_id, messages=messages, max_completion_tokens=12,
                                               temperature=0, stream=True, stream_options={"include_usage": True}))
  assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.completion_tokens == len(alone)
  assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
  assert chunks[-2].choices[0].finish_reason in ("stop", "length")
  stopped = client.chat.completions.create(model=srv.model_id, messages=messages, max_tokens=12, temperature=0,
                                           stop=[want[2:4]] if len(want) > 3 else None)
  assert want.startswith(stopped.choices[0].message.content)
  # logprobs: the model's log-probabilities of the greedy tokens, the top alternatives first
  lp = client.chat.completions.create(model=srv.model_id, messages=messages, max_tokens=12, temperature=0,
                                      logprobs=True, top_logprobs=3).choices[0].logprobs.content
  assert len(lp) == len(alone) and all(len(t.top_logprobs) == 3 for t in lp)
  assert all(t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-5) for t in lp)  # greedy: the best
  full = np.asarray(jax.nn.log_softmax(srv.scheduler.engine.model(jnp.asarray([prompt + alone]))[0], axis=-1))
  want_lp = [full[len(prompt) - 1 + i, t] for i, t in enumerate(alone)]
  np.testing.assert_allclose([t.logprob for t in lp], want_lp, atol=2e-4)
  text_lp = client.completions.create(model=srv.model_id, prompt=prompt, max_tokens=12, temperature=0,
                                      logprobs=2).choices[0].logprobs
  np.testing.assert_allclose(text_lp.token_logprobs, want_lp, atol=2e-4)
  assert all(1 <= len(d) <= 2 for d in text_lp.top_logprobs) and text_lp.text_offset[0] == 0
  # parts, developer role; and refusals that name the field
  parts = [{"role": "developer", "content": [{"type": "text", "text": "You write "}, {"type": "text", "text": "Python."}]},
           {"role": "user", "content": "a loop"}]
  assert client.chat.completions.create(model=srv.model_id, messages=parts, max_tokens=12,
                                        temperature=0).choices[0].message.content == want
  for bad, param in (({"messages": []}, "messages"), ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
                     ({"messages": messages, "tools": [{"type": "function"}]}, "tools"),
                     ({"messages": messages, "extra_body": {"prompt": "x"}}, "prompt"),
                     ({"messages": messages, "max_tokens": 4, "max_completion_tokens": 4}, "max_completion_tokens"),
                     ({"messages": messages, "top_logprobs": 2}, "top_logprobs"),
                     ({"messages": messages, "logprobs": True, "top_logprobs": 9}, "top_logprobs")):
    with pytest.raises(openai.BadRequestError) as e:
      client.chat.completions.create(model=srv.model_id, **bad)
    assert e.value.body["param"] == param, (bad, e.value.body)


def test_a_client_that_disconnects_is_cancelled_and_its_pages_freed(server, monkeypatch):
  srv, bg = server
  engine = srv.scheduler.engine
  slow = getattr(engine, _iteration(engine))
  monkeypatch.setattr(engine, _iteration(engine), lambda: (time.sleep(0.05), slow())[1])  # 48 tokens take ~2.4 s
  finished = []
  monkeypatch.setattr(srv.scheduler, "on_finish", finished.append)

  async def go():
    async with aiohttp.ClientSession() as s:
      body = {"prompt": "while True:", "max_tokens": 48, "temperature": 0, "stream": True}
      async with s.post(bg.url + "/v1/completions", json=body) as r:
        assert r.status == 200
        await r.content.readline()  # the first event arrived: the request is running
    # leaving the block closes the connection mid-stream

  asyncio.run(go())
  deadline = time.time() + 10
  while not finished and time.time() < deadline:
    time.sleep(0.02)
  assert [r.finish_reason for r in finished] == ["cancelled"]
  assert len(finished[0].output_ids) < 48
  assert engine.active_slots == 0 and engine.free_pages == engine.num_pages - 1


def test_the_load_generator_sends_bursts_and_polls_the_pool_occupancy(server):
  srv, bg = server
  mix = serve_load.request_mix(6, srv.scheduler.engine.model.spec.vocab_size, 64, seed=1, prompt_lengths=(20, 40),
                               output_lengths=(16, 24))
  samples = {}
  results, seconds = asyncio.run(serve_load.run_load(bg.url, mix, concurrency=1, max_seconds=60, burst=3,
                                                     burst_interval=0.2, samples=samples))
  assert [r["status"] for r in results] == [200] * 6 and all(r["tokens"] >= 16 for r in results)
  assert seconds >= 0.2 and set(samples) == set(serve_load.POLLED)
  assert max(samples["peakllm_active_slots"]) >= 2 and max(samples["peakllm_used_pages"]) >= 2  # bursts overlap
  assert srv.scheduler.engine.used_pages == 0


def test_metrics_and_health(server):
  _, bg = server
  import urllib.request

  text = urllib.request.urlopen(bg.url + "/metrics").read().decode()
  for name in ("peakllm_queue_length", "peakllm_active_slots", "peakllm_free_pages", "peakllm_prefix_cache_hit_rate",
               "peakllm_cached_pages", "peakllm_tokens_per_second",
               "peakllm_time_to_first_token_seconds_bucket", "peakllm_time_per_output_token_seconds_bucket"):
    assert name in text
  assert json.loads(urllib.request.urlopen(bg.url + "/health").read()) == {"status": "ok"}


def test_draining_server_answers_503(server):
  srv, bg = server
  import urllib.error
  import urllib.request

  srv.draining = True
  try:
    for path, data in (("/health", None), ("/v1/completions", b'{"prompt": "a"}')):
      with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(bg.url + path, data=data))
      assert e.value.code == 503
  finally:
    srv.draining = False


def test_sigterm_drains_in_flight_requests_then_exits(tiny_run):
  import signal
  import socket
  import subprocess
  import sys
  import urllib.error
  import urllib.request

  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  proc = subprocess.Popen([sys.executable, "-m", "infer.serve", f"--workdir={tiny_run[0]}", f"--port={port}",
                           "--slots=2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  url = f"http://127.0.0.1:{port}"
  try:
    deadline = time.time() + 120
    while True:
      assert proc.poll() is None and time.time() < deadline, "the server did not start"
      try:
        urllib.request.urlopen(url + "/health")
        break
      except OSError:
        time.sleep(0.3)

    async def go():
      async with aiohttp.ClientSession() as s:
        # 16 choices x 40 tokens on 2 slots: seconds of work still in flight when SIGTERM arrives
        body = {"prompt": "def ", "max_tokens": 40, "n": 16, "ignore_eos": True, "temperature": 0, "stream": True}
        async with s.post(url + "/v1/completions", json=body) as r:
          assert r.status == 200
          await r.content.readline()
          proc.send_signal(signal.SIGTERM)
          await asyncio.sleep(0.2)
          async with s.get(url + "/health") as h:
            health = h.status
          lines = [line async for line in r.content]
      return health, [json.loads(x[6:]) for x in lines if x.startswith(b"data: {")]

    health, events = asyncio.run(go())
    assert health == 503
    finished = [c for e in events for c in e["choices"] if c["finish_reason"]]
    assert sorted(c["index"] for c in finished) == list(range(16))
    assert all(c["finish_reason"] == "length" for c in finished)
    assert proc.wait(timeout=60) == 0
    assert "drained" in proc.stdout.read()
  finally:
    if proc.poll() is None:
      proc.kill()


def test_fuzzed_completion_requests_get_200_or_a_json_4xx_and_the_server_stays_healthy(server):
  """Property-based: bodies built from the request schema's fields (and strangers) with arbitrary JSON values,
  valid ones among them, never produce a 5xx or a non-JSON error, and the server stays healthy."""
  import urllib.error
  import urllib.request

  from hypothesis import HealthCheck, given, settings
  from hypothesis import strategies as st

  from infer import server as server_lib

  _, bg = server
  scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.integers(-3, 80),
                      st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 2), st.text(max_size=40))
  values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
      st.text(max_size=8), inner, max_size=3), max_leaves=12)
  prompts = st.one_of(st.text(max_size=60), st.lists(st.integers(0, 600), max_size=20),
                      st.lists(st.text(max_size=20), max_size=3), values)
  fields = st.sampled_from(sorted(server_lib.KNOWN) + ["bogus", "messages"])
  bodies = st.fixed_dictionaries({"prompt": prompts, "max_tokens": st.integers(1, 8)},
                                 optional={"n": st.integers(0, 3), "temperature": st.floats(0, 2)}) | st.dictionaries(
      fields, values, max_size=6).map(lambda d: {**d, "prompt": d.get("prompt", "x")})

  def post(body):
    data = json.dumps(body, allow_nan=True).encode()
    request = urllib.request.Request(bg.url + "/v1/completions", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
      with urllib.request.urlopen(request, timeout=60) as r:
        return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
      return e.code, e.read().decode()

  @settings(max_examples=60, deadline=None, derandomize=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
  @given(bodies)
  def check(body):
    status, text = post(body)
    assert status in (200, 400, 404, 413, 415, 429), (status, body, text[:300])
    if status == 200 and body.get("stream") is True:
      assert text.rstrip().endswith("data: [DONE]"), text[-300:]
    else:
      parsed = json.loads(text)
      assert ("choices" in parsed) if status == 200 else set(parsed["error"]) >= {"message", "type"}

  check()
  assert json.loads(urllib.request.urlopen(bg.url + "/health").read()) == {"status": "ok"}


def test_the_profile_endpoints_trace_the_engine_between_start_and_stop(server, tmp_path):
  import glob
  import urllib.error
  import urllib.request

  srv, _ = server
  traced = Server(srv.scheduler, srv.tokenizer, srv.model_id, srv.metrics, profile_dir=str(tmp_path / "trace"))

  def post(url, body=None):
    request = urllib.request.Request(url, data=json.dumps(body or {}).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
      with urllib.request.urlopen(request, timeout=120) as r:
        return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
      return e.code, json.loads(e.read())

  with BackgroundServer(traced) as bg:
    assert post(bg.url + "/debug/profile/stop")[0] == 409  # nothing to stop yet
    assert post(bg.url + "/debug/profile/start")[0] == 200
    assert post(bg.url + "/debug/profile/start")[0] == 409
    assert post(bg.url + "/v1/completions", {"prompt": "def", "max_tokens": 4})[0] == 200
    status, result = post(bg.url + "/debug/profile/stop")
  assert status == 200 and result["busy_s"] > 0 and result["top_ms"] and "operation" in result["table"]
  assert glob.glob(str(tmp_path / "trace" / "plugins" / "profile" / "*" / "*.xplane.pb"))
