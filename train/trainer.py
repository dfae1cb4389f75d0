"""The training loop: data, state, compiled step, evaluation, checkpoints, metrics, and a closing sample.

`run(config, workdir)` is everything `python -m train` does. Re-running it on the same workdir resumes from the latest
checkpoint (parameters, optimizer state, step, RNG and data position), and SIGTERM/SIGINT save a checkpoint and stop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

from configs import base
from infer import evaluate as evaluate_lib
from model import flops
from model import sharding
from model.transformer import ModelSpec, Transformer
from train import checkpoint as checkpoint_lib
from train import data as data_lib
from train import metrics as metrics_lib
from train import optim
from train import pipeline
from train import step as step_lib
from train import distributed
from train import tokenizer as tokenizer_lib

log = logging.getLogger("peakllm.train")


class _StopRequest:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps (so a checkpoint can be written)."""

  def __init__(self):
    self.signal = None

  def __call__(self, signum, _frame):
    self.signal = signum

  @contextlib.contextmanager
  def installed(self):
    previous = {s: signal.signal(s, self) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
      yield self
    finally:
      for s, handler in previous.items():
        signal.signal(s, handler)


def write_config(config, workdir: str) -> None:
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2))


def _log_compiled(compiled) -> None:
  try:
    mem = compiled.memory_analysis()
  except Exception:  # not every backend reports memory
    mem = None
  if mem is not None:
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes")
    sizes = {f: getattr(mem, f, None) for f in fields}
    log.info("train step memory (MiB): %s", {k: round(v / 2**20, 1) for k, v in sizes.items() if v is not None})


def run(config, workdir: str, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
  """Trains per `config` in `workdir` and returns a summary (final eval loss/ppl, throughput, MFU, sample).

  `on_step(step)` is called after every finished step (tests use it to deliver signals at a chosen step).
  """
  base.validate(config)
  if config.model.quant != "none":
    raise ValueError(f"config.model.quant={config.model.quant!r} is for inference: train in float, then run "
                     "`python -m scripts.quantize`")
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    write_config(config, workdir)
  t = config.train

  if is_main:  # process 0 prepares the data (and tokenizer) first; the others then read what it wrote
    sources = data_lib.load_sources(config)
    tokenizer = tokenizer_lib.load_or_train(config, workdir)
  distributed.barrier("peakllm:data-ready")
  if not is_main:
    sources = data_lib.load_sources(config)
    tokenizer = tokenizer_lib.load_or_train(config, workdir)
  if tokenizer.get_vocab_size() > config.model.vocab_size:
    raise ValueError(f"config.model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
                     f"{tokenizer.get_vocab_size()} entries: raise it or use another data.tokenizer_path")

  spec = ModelSpec.from_config(config.model)
  graphdef = step_lib.model_graphdef(spec)
  abstract_params = jax.eval_shape(lambda: step_lib.init_params(spec, t.seed))
  optimizer = optim.make_optimizer(t, abstract_params)
  schedule = optim.make_schedule(t)
  abstract_state = jax.eval_shape(lambda: step_lib.init_state(spec, optimizer, t.seed))
  mesh = sharding.make_mesh(dict(config.mesh))
  param_specs = sharding.param_specs(nnx.eval_shape(lambda: Transformer(spec, rngs=nnx.Rngs(params=0))))
  sharding.check_divisible(abstract_params, param_specs, mesh)
  if t.offload_optimizer and not all("pinned_host" in {m.kind for m in d.addressable_memories()}
                                     for d in mesh.devices.flat if d.process_index == jax.process_index()):
    raise ValueError(f"config.train.offload_optimizer=True needs devices with pinned host memory; "
                     f"{jax.default_backend()} devices here have none")
  state_sh = sharding.state_shardings(mesh, abstract_state, param_specs, optimizer, t.offload_optimizer)
  batch_sh = sharding.batch_sharding(mesh)
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
                                state_sh)

  train_iter = data_lib.make_iterator(config, sources["train"], tokenizer, split="train",
                                      shard_index=jax.process_index(), shard_count=jax.process_count())
  ckpt = checkpoint_lib.Checkpointer(workdir, t.max_to_keep, t.async_checkpoint)
  start_step = ckpt.latest_step()
  if start_step is not None:
    state = ckpt.restore(start_step, abstract_state, train_iter)
    log.info("resumed from step %d", start_step)
  else:
    device_sh = jax.tree.map(lambda s: s.with_memory_kind("device"), state_sh)
    if t.init_from:  # fine-tuning: the parameters of another workdir (a run, or a Hugging Face import)
      params = _initial_params(t.init_from, abstract_state["params"])
      state = jax.jit(lambda p: step_lib.state_from_params(p, optimizer, t.seed), out_shardings=device_sh,
                      donate_argnums=0)(params)
    else:
      state = jax.jit(lambda: step_lib.init_state(spec, optimizer, t.seed), out_shardings=device_sh)()
    state = jax.device_put(state, state_sh)  # optimizer state to host memory when offloaded
    start_step = 0

  batch_spec = {k: jax.ShapeDtypeStruct((t.batch_size, config.data.seq_len),  # the global batch
                                       jnp.float32 if k == "weights" else jnp.int32, sharding=batch_sh)
                for k in ("inputs", "targets", "segment_ids", "positions", "weights")}
  with jax.set_mesh(mesh):  # activations' logical constraints resolve against this mesh while tracing
    compiled = step_lib.jit_train_step(graphdef, optimizer, schedule, t.grad_accum_steps, t.z_loss, state_sh,
                                       batch_sh, moe_coefs=(t.moe_aux_loss, t.router_z_loss),
                                       offload_optimizer=t.offload_optimizer).lower(abstract_state, batch_spec).compile()
  log.info("mesh %s over %d devices", dict(mesh.shape), mesh.size)
  stages = dict(mesh.shape).get("pipeline", 1)
  microbatches = pipeline.default_microbatches(stages, spec.pipeline_microbatches)
  bubble = pipeline.bubble_fraction(stages, microbatches)
  if stages > 1:
    log.info("pipeline: %d stages x %d micro-batches (GPipe), bubble fraction %.3f", stages, microbatches, bubble)
  _log_compiled(compiled)
  eval_fn = step_lib.jit_eval_step(graphdef)
  to_global = lambda b: distributed.global_batch(b, batch_sh)  # noqa: E731

  n_params = flops.param_count(spec)
  flops_per_token = flops.flops_per_token(spec, config.data.seq_len)
  peak, peak_source = metrics_lib.peak_flops_per_device(config.model.dtype, t.peak_flops)
  step_devices = len(jax.tree.leaves(compiled.output_shardings)[0].device_set)  # devices the step really uses
  peak_total = peak * step_devices
  log.info("model: %s, %.2fM parameters, %.1f MFLOPs/token; peak %.3g FLOP/s per device (%s)",
           spec.family, n_params / 1e6, flops_per_token / 1e6, peak, peak_source)

  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)
  stop = _StopRequest()
  bar = tqdm.tqdm(total=t.steps, initial=start_step, disable=not (t.progress_bar and is_main), unit="step",
                  dynamic_ncols=True)
  step = start_step
  last_eval: dict[str, float] = {}
  throughput = {"tokens_per_sec": 0.0, "mfu": 0.0}
  tokens_per_step = t.batch_size * config.data.seq_len
  window_start, window_steps = time.perf_counter(), 0
  interrupted = False
  with stop.installed():
    while step < t.steps:
      if stop.signal is not None:
        interrupted = True
        break
      batch = distributed.global_batch(next(train_iter), batch_sh)
      state, step_metrics = compiled(state, batch)
      step += 1
      window_steps += 1
      bar.update(1)
      if step % t.log_every == 0 or step == t.steps:
        row = jax.device_get(step_metrics)  # blocks, so the window timing covers finished work
        elapsed = time.perf_counter() - window_start
        step_time = elapsed / window_steps
        tps = tokens_per_step / step_time
        throughput = {"tokens_per_sec": tps, "mfu": metrics_lib.mfu(flops_per_token, tps, peak_total)}
        out = {"loss": row["loss"], "learning_rate": row["learning_rate"], "grad_norm": row["grad_norm"],
               "tokens_per_sec": tps, "step_time_s": step_time, "mfu": throughput["mfu"]}
        if t.z_loss or spec.num_experts:
          out["objective"] = row["objective"]
        out.update({k: v for k, v in row.items() if k.startswith("moe_")})  # load balance, router z, dropped share
        if not np.isfinite(out["loss"]):
          raise FloatingPointError(f"loss is {out['loss']} at step {step}; lower train.learning_rate or clip harder")
        writer.write(step, out)
        bar.set_postfix(loss=f"{out['loss']:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{throughput['mfu']:.1%}")
        window_start, window_steps = time.perf_counter(), 0
      if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
        last_eval = evaluate_lib.validation_loss(eval_fn, state["params"], config, sources["validation"], tokenizer,
                                                 to_global=to_global)
        writer.write(step, last_eval)
        bar.write(f"step {step}: eval loss {last_eval['eval_loss']:.4f}, perplexity {last_eval['eval_ppl']:.2f}")
        window_start, window_steps = time.perf_counter(), 0
      if step % t.checkpoint_every == 0 or step == t.steps:
        ckpt.save(step, state, train_iter)
      if on_step is not None:
        on_step(step)
    if interrupted:
      log.warning("signal %s: saving a checkpoint at step %d and stopping", stop.signal, step)
      ckpt.save(step, state, train_iter)
    ckpt.close()
  bar.close()

  summary: dict[str, Any] = {"step": step, "interrupted": interrupted, "parameters": n_params, **throughput,
                             "pipeline_bubble_fraction": bubble}
  if not interrupted:
    if not last_eval:
      last_eval = evaluate_lib.validation_loss(eval_fn, state["params"], config, sources["validation"], tokenizer,
                                               to_global=to_global)
    summary.update(last_eval)
    if jax.process_count() == 1:
      summary["sample"] = _sample(config, spec, graphdef, state["params"], tokenizer)
    else:
      summary["sample"] = "(no sample in multi-process runs: use python -m infer.generate on the workdir)"
  writer.close()
  if is_main:
    with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
      json.dump({k: v for k, v in summary.items()}, f, indent=2)
  return summary


def _initial_params(source: str, abstract_params):
  """The latest parameters of the workdir `source`, placed as `abstract_params` (with shardings) says; ValueError
  naming the first parameter whose shape differs (the model configs must match)."""
  source_spec = ModelSpec.from_config(checkpoint_lib.load_config(source).model)
  theirs = jax.eval_shape(lambda: step_lib.init_params(source_spec, 0))
  ours_flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  theirs_flat = dict(jax.tree_util.tree_flatten_with_path(theirs)[0])
  for path, leaf in ours_flat:
    other = theirs_flat.get(path)
    if other is None or other.shape != leaf.shape:
      raise ValueError(f"config.train.init_from={source!r}: parameter {jax.tree_util.keystr(path)} is "
                       f"{None if other is None else other.shape} there but {leaf.shape} in this config's model; "
                       f"start from that workdir's model config (configs/finetune.py does)")
  params, step = checkpoint_lib.restore_params(source, abstract_params)
  log.info("initialised from %s (step %d)", source, step)
  return params


def _sample(config, spec, graphdef, params, tokenizer) -> str:
  from infer import generate  # inference reads trained params; imported here to keep the module graph one-way

  s = config.sample
  if s.max_new_tokens == 0:
    return ""
  room = spec.max_len - len(generate.encode_prompt(tokenizer, s.prompt))
  if room < 1:
    log.warning("sample.prompt is %d tokens; no room to sample within model.max_len=%d", spec.max_len - room,
                spec.max_len)
    return s.prompt
  model = nnx.merge(graphdef, params)
  (text,) = generate.generate_text(model, tokenizer, [s.prompt], max_new_tokens=min(s.max_new_tokens, room),
                                   temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=config.train.seed)
  return s.prompt + text
