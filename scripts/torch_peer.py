"""The HF-PyTorch peer the benchmarks measure beside us in the same run: `GPT2LMHeadModel` at our shape, eager.

Imported only by the benchmarks (torch and transformers come with the test extra); `available()` says whether they
are installed, so a benchmark without them still runs and says the peer was skipped.
"""

from __future__ import annotations

import importlib.util
import statistics
import time

import numpy as np


def available() -> bool:
  return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


def gpt2_model(spec, threads: int):
  """A randomly initialised `GPT2LMHeadModel` of `spec`'s shape (dropout off, tied embeddings as in the spec), with
  torch limited to `threads` threads."""
  import torch  # the peer's own dependency, present with the test extra only
  import transformers

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  hf = transformers.GPT2Config(vocab_size=spec.vocab_size, n_positions=spec.max_len, n_embd=spec.embed_dim,
                               n_layer=spec.num_layers, n_head=spec.num_heads, n_inner=spec.mlp_dim,
                               activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                               layer_norm_epsilon=spec.norm_eps, tie_word_embeddings=spec.tie_embeddings,
                               bos_token_id=0, eos_token_id=0)
  return transformers.GPT2LMHeadModel(hf)


def train_tokens_per_sec(spec, batch: int, seq_len: int, *, autocast_bf16: bool, steps: int, warmup: int,
                         threads: int = 2, lr: float = 1e-3) -> dict:
  """Median tokens/s of eager training steps (forward with labels, backward, AdamW) on random batches, float32 or
  with bfloat16 autocast. Returns {"tokens_per_sec", "step_time_s", "final_loss"}."""
  import torch

  model = gpt2_model(spec, threads).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
  rng = np.random.default_rng(0)
  batches = [torch.from_numpy(rng.integers(0, spec.vocab_size, (batch, seq_len)).astype(np.int64)) for _ in range(4)]

  def step(ids):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
      loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())

  for i in range(warmup):
    step(batches[i % 4])
  times = []
  for i in range(steps):
    start = time.perf_counter()
    loss = step(batches[i % 4])
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  return {"tokens_per_sec": batch * seq_len / step_s, "step_time_s": step_s, "final_loss": loss}


def generate_tokens_per_sec(spec, batch: int, prompt_len: int, new_tokens: int, *, repeats: int,
                            threads: int = 2) -> dict:
  """Greedy `GPT2LMHeadModel.generate` (KV cache, float32, exactly `new_tokens` new tokens) on random prompts of
  `prompt_len` tokens: median tokens/s and time to first token. Returns {"tokens_per_s", "ttft_s"}."""
  import torch

  model = gpt2_model(spec, threads).eval()
  ids = torch.from_numpy(np.random.default_rng(0).integers(1, spec.vocab_size, (batch, prompt_len)).astype(np.int64))
  mask = torch.ones_like(ids)

  def run(n):
    with torch.inference_mode():
      model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                     pad_token_id=0)

  def median_seconds(n):
    run(n)  # warm-up
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      run(n)
      times.append(time.perf_counter() - start)
    return statistics.median(times)

  return {"tokens_per_s": batch * new_tokens / median_seconds(new_tokens), "ttft_s": median_seconds(1)}
