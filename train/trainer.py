"""The training loop: data, state, compiled step, evaluation, checkpoints, metrics, and a closing sample.

`run(config, workdir)` is everything `python -m train` does. Re-running it on the same workdir resumes from the latest
checkpoint (parameters, optimizer state, step, RNG and data position), and SIGTERM/SIGINT save a checkpoint and stop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import tqdm
from flax import nnx
from tokenizers import Tokenizer

from configs import base
from model import flops
from model import lora
from model import pipeline
from model import transformer
from model.transformer import ModelSpec, Transformer
from train import bpe
from train import data as data_lib
from train import distributed
from train import metrics as metrics_lib
from train import profiling
from train import setup as setup_lib
from train import step as step_lib
from train import validation
from workdir import checkpoint as checkpoint_lib
from workdir import layout

log = logging.getLogger("peakllm.train")


class _StopRequest:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps (so a checkpoint can be written); a second
  signal exits at once (the checkpoint being written, if any, is set aside on the next start)."""

  def __init__(self):
    self.signal = None

  def __call__(self, signum, _frame):
    if self.signal is not None:
      sys.stderr.write(f"second signal ({signum}): exiting now without a checkpoint\n")
      os._exit(128 + signum)
    self.signal = signum

  @contextlib.contextmanager
  def installed(self):
    previous = {s: signal.signal(s, self) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
      yield self
    finally:
      for s, handler in previous.items():
        signal.signal(s, handler)


def _log_compiled(compiled) -> None:
  try:
    mem = compiled.memory_analysis()
  except Exception:  # not every backend reports memory
    mem = None
  if mem is not None:
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes")
    sizes = {f: getattr(mem, f, None) for f in fields}
    log.info("train step memory (MiB): %s", {k: round(v / 2**20, 1) for k, v in sizes.items() if v is not None})


ClosingSample = Callable[[Transformer, Tokenizer, ml_collections.ConfigDict], str]


def run(config, workdir: str, on_step: Callable[[int], None] | None = None,
        closing_sample: ClosingSample | None = None) -> dict[str, Any]:
  """Trains per `config` in `workdir` and returns a summary (final eval loss/ppl, throughput, MFU, and with
  `closing_sample` the text it returns for the trained model, e.g. `infer.generate.closing_sample`).

  `on_step(step)` is called after every finished step (tests use it to deliver signals at a chosen step).
  """
  base.validate(config)
  if config.model.quant != "none":
    raise ValueError(f"config.model.quant={config.model.quant!r} is for inference: train in float, then run "
                     "`python -m infer.quantize`")
  is_main = jax.process_index() == 0
  layout.check_resumable(workdir, config)  # a changed model, data or optimizer config is refused, nothing touched
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    layout.write_config(config, workdir)
  t = config.train

  if is_main:  # process 0 prepares the data (and tokenizer) first; the others then read what it wrote
    sources = data_lib.load_sources(config)
    tokenizer = bpe.load_or_train(config, workdir)
  distributed.barrier("peakllm:data-ready")
  if not is_main:
    sources = data_lib.load_sources(config)
    tokenizer = bpe.load_or_train(config, workdir)
  if tokenizer.get_vocab_size() > config.model.vocab_size:
    raise ValueError(f"config.model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
                     f"{tokenizer.get_vocab_size()} entries: raise it or use another data.tokenizer_path")

  setup = setup_lib.build(config)
  spec, mesh, batch_sh = setup.spec, setup.mesh, setup.batch_sharding

  train_iter = data_lib.make_iterator(config, sources["train"], tokenizer, split="train",
                                      shard_index=jax.process_index(), shard_count=jax.process_count())
  ckpt = checkpoint_lib.Checkpointer(workdir, t.max_to_keep, t.async_checkpoint)
  state, start_step = ckpt.restore_latest(setup.abstract_state, train_iter)  # damaged newer steps set aside
  if start_step is not None:
    log.info("resumed from step %d", start_step)
  else:  # fine-tuning starts from the parameters of another workdir (a run, or a Hugging Face import)
    if t.init_from:
      target = (jax.eval_shape(lambda: transformer.init_params(lora.base_spec(spec), t.seed)) if spec.lora_rank
                else setup.abstract_state["params"])
      state = setup.init_state(_initial_params(t.init_from, target))
    else:
      state = setup.init_state()
    if spec.lora_rank:
      log.info("LoRA rank %d on %s: %s trainable parameters, %s frozen (base %s)", spec.lora_rank,
               ",".join(spec.lora_targets), f"{lora.count(state['params']):,}", f"{lora.count(state['frozen']):,}",
               t.lora.base_quant)
    start_step = 0
  compiled = setup.compile()
  log.info("mesh %s over %d devices", dict(mesh.shape), mesh.size)
  stages = dict(mesh.shape).get("pipeline", 1)
  microbatches = pipeline.default_microbatches(stages, spec.pipeline_microbatches)
  bubble = pipeline.bubble_fraction(stages, microbatches)
  if stages > 1:
    log.info("pipeline: %d stages x %d micro-batches (GPipe), bubble fraction %.3f", stages, microbatches, bubble)
  _log_compiled(compiled)
  eval_fn = step_lib.jit_eval_step(setup.graphdef)
  to_global = lambda b: distributed.global_batch(b, batch_sh)  # noqa: E731

  n_params = flops.param_count(spec)
  flops_per_token = flops.flops_per_token(spec, config.data.seq_len)
  # MFU against the rate of the dtype the matmuls run in (model.matmul_dtype when it differs from model.dtype)
  matmul_dtype = config.model.matmul_dtype or config.model.dtype
  peak, peak_source = metrics_lib.peak_flops_per_device(matmul_dtype, t.peak_flops)
  step_devices = len(jax.tree.leaves(compiled.output_shardings)[0].device_set)  # devices the step really uses
  peak_total = peak * step_devices
  log.info("model: %s, %.2fM parameters, %.1f MFLOPs/token; peak %.3g FLOP/s per device (%s)",
           spec.family, n_params / 1e6, flops_per_token / 1e6, peak, peak_source)

  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main, keep_through_step=start_step)
  stop = _StopRequest()
  bar = tqdm.tqdm(total=t.steps, initial=start_step, disable=not (t.progress_bar and is_main), unit="step",
                  dynamic_ncols=True)
  step = start_step
  last_eval: dict[str, float] = {}
  throughput = {"tokens_per_sec": 0.0, "mfu": 0.0}
  tokens_per_step = t.batch_size * config.data.seq_len
  window_start, window_steps = time.perf_counter(), 0
  interrupted = False
  profiler = profiling.StepProfiler(base.profile_steps(config), layout.path(workdir, layout.PROFILE))
  nonfinite = _NonfiniteSteps(t.nonfinite, t.nonfinite_max_skips, first_step=start_step)
  with stop.installed():
    try:
      while step < t.steps:
        if stop.signal is not None:
          interrupted = True
          break
        batch = distributed.global_batch(next(train_iter), batch_sh)
        profiler.before(step + 1)
        state, step_metrics = compiled(state, batch)
        step += 1
        nonfinite.add(step_metrics["nonfinite"])
        profiler.after(step, step_metrics)
        if profiler.summary is not None:
          _log_profile(profiler)
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
          if nonfinite.check():  # raises for nonfinite=stop, or too many skips in a row
            out["nonfinite_steps"] = nonfinite.total
          writer.write(step, {k: v for k, v in out.items() if np.isfinite(v)})
          bar.set_postfix(loss=f"{out['loss']:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{throughput['mfu']:.1%}")
          window_start, window_steps = time.perf_counter(), 0
        if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
          last_eval = validation.validation_loss(eval_fn, step_lib.model_params(state), config,
                                                 sources["validation"], tokenizer, to_global=to_global)
          writer.write(step, last_eval)
          bar.write(f"step {step}: eval loss {last_eval['eval_loss']:.4f}, perplexity {last_eval['eval_ppl']:.2f}")
          window_start, window_steps = time.perf_counter(), 0
        if step % t.checkpoint_every == 0 or step == t.steps:
          nonfinite.check()
          ckpt.save(step, state, train_iter)
        if on_step is not None:
          on_step(step)
    except FloatingPointError:  # train.nonfinite stops the run: saves in flight finish, nothing new is saved
      ckpt.close()
      raise
    if profiler.active:  # the run ended (or was stopped) inside the profiled range
      profiler.stop(step_metrics)
      _log_profile(profiler)
    if interrupted:
      log.warning("signal %s: saving a checkpoint at step %d and stopping", stop.signal, step)
      ckpt.save(step, state, train_iter)
    ckpt.close()
  bar.close()

  summary: dict[str, Any] = {"step": step, "interrupted": interrupted, "parameters": n_params, **throughput,
                             "pipeline_bubble_fraction": bubble}
  if not interrupted:
    if not last_eval:
      last_eval = validation.validation_loss(eval_fn, step_lib.model_params(state), config,
                                             sources["validation"], tokenizer, to_global=to_global)
    summary.update(last_eval)
    if closing_sample is not None and jax.process_count() == 1:
      summary["sample"] = closing_sample(nnx.merge(setup.graphdef, step_lib.model_params(state)), tokenizer, config)
    elif closing_sample is not None:
      summary["sample"] = "(no sample in multi-process runs: use python -m infer.generate on the workdir)"
  writer.close()
  if is_main:
    layout.write_json(layout.path(workdir, layout.SUMMARY), summary, indent=2)
  return summary


class _NonfiniteSteps:
  """Host side of `train.nonfinite`: the step never applies a NaN/inf update (train/step.py) and reports it in
  metrics["nonfinite"]; this keeps the counts on device (no host sync per step) and `check` reads them at log and
  checkpoint steps, raising FloatingPointError for `stop` or for more than `max_skips` skipped steps in a row."""

  def __init__(self, mode: str, max_skips: int, first_step: int):
    self.mode, self.max_skips, self.total = mode, max_skips, 0
    self._counts = jnp.zeros(3, jnp.int32)  # skipped in a row, skipped in all, the last skipped step (this run)
    self._step = first_step
    self._add = jax.jit(lambda c, bad, step: jnp.stack([jnp.where(bad > 0, c[0] + 1, 0), c[1] + bad,
                                                        jnp.where(bad > 0, step, c[2])]))

  def add(self, flag: jax.Array) -> None:
    self._step += 1
    self._counts = self._add(self._counts, flag, self._step)

  def check(self) -> bool:
    """True when steps of this run were skipped (logged once per new skip); raises when the run must stop."""
    in_a_row, total, last = (int(v) for v in jax.device_get(self._counts))
    if total > self.total:
      log.warning("%d step(s) had a non-finite loss or gradient norm and were not applied (last: step %d)",
                  total - self.total, last)
      self.total = total
    advice = "lower train.learning_rate, clip harder (train.grad_clip) or check the data"
    if total and self.mode == "stop":
      raise FloatingPointError(f"non-finite loss or gradient norm at step {last} (train.nonfinite=stop): stopped "
                               f"without saving; the parameters of the last checkpoint are finite. {advice}")
    if in_a_row > self.max_skips:
      raise FloatingPointError(f"{in_a_row} steps in a row had a non-finite loss or gradient norm (last: step "
                               f"{last}), more than train.nonfinite_max_skips={self.max_skips}. {advice}")
    return total > 0


def _log_profile(profiler: profiling.StepProfiler) -> None:
  """Logs the finished trace's top operations once, then forgets the summary."""
  summary, profiler.summary = profiler.summary, None
  log.info("profile of steps %d-%d (view: tensorboard --logdir %s, or its perfetto_trace.json.gz in ui.perfetto.dev)"
           "\n%s", *profiler.traced, profiler.logdir, summary.table(steps=profiler.traced[1] - profiler.traced[0] + 1))


def _initial_params(source: str, abstract_params):
  """The latest parameters of the workdir `source`, placed as `abstract_params` (with shardings) says; ValueError
  naming the first parameter whose shape differs (the model configs must match)."""
  source_config = layout.load_config(source)
  if source_config.train.lora.rank:
    raise ValueError(f"config.train.init_from={source!r} is a LoRA run: merge its adapters first (python -m "
                     "scripts.convert --merge_lora ...) and start from the merged workdir")
  source_spec = ModelSpec.from_config(source_config.model)
  theirs = jax.eval_shape(lambda: transformer.init_params(source_spec, 0))
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
