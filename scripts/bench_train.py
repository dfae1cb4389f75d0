"""Training-step benchmark: warmed-up median tokens/s and step time of a config, with MFU against this device's
dense matmul rates (float32, and bfloat16 operands with float32 accumulation) measured in the same run.

  python -m scripts.bench_train [--config=configs/shape_s.py] [--config.model.dtype=bfloat16] [--steps=20]
      [--out=bench_train.json]

Batches are random tokens of the config's shape (one document per row), so the data pipeline is not measured; the
step is the trainer's own jitted, donated train step.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from configs import base
from model import flops
from model.transformer import ModelSpec
from train import metrics, optim
from train import step as step_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/shape_s.py", "Config to benchmark.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps (after warm-up).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
_OUT = flags.DEFINE_string("out", "bench_train.json", "Where to write the JSON results.")


def random_batch(config, seed: int) -> dict[str, np.ndarray]:
  b, l = config.train.batch_size, config.data.seq_len
  tokens = np.random.default_rng(seed).integers(0, config.model.vocab_size, (b, l + 1)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((b, l), np.int32),
          "positions": np.broadcast_to(np.arange(l, dtype=np.int32), (b, l)).copy(),
          "weights": np.ones((b, l), np.float32)}


def benchmark(config, steps: int, warmup: int) -> dict:
  """Times `steps` train steps of `config` (each blocked) after compilation and `warmup` steps."""
  base.validate(config)
  t = config.train
  spec = ModelSpec.from_config(config.model)
  params = jax.eval_shape(lambda: step_lib.init_params(spec, 0))
  optimizer = optim.make_optimizer(t, params)
  state = jax.jit(lambda: step_lib.init_state(spec, optimizer, 0))()
  step_fn = step_lib.jit_train_step(step_lib.model_graphdef(spec), optimizer, optim.make_schedule(t),
                                    t.grad_accum_steps, t.z_loss)
  batches = [jax.device_put(random_batch(config, i)) for i in range(4)]
  start = time.perf_counter()
  state, m = step_fn(state, batches[0])
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - start
  for i in range(warmup):
    state, m = step_fn(state, batches[i % 4])
  jax.block_until_ready(m)
  times, losses = [], []
  for i in range(steps):
    start = time.perf_counter()
    state, m = step_fn(state, batches[i % 4])
    jax.block_until_ready(m)
    times.append(time.perf_counter() - start)
    losses.append(float(m["loss"]))
  step_s = statistics.median(times)
  tokens = t.batch_size * config.data.seq_len
  return {"step_time_s": step_s, "tokens_per_sec": tokens / step_s, "compile_s": compile_s,
          "flops_per_token": flops.flops_per_token(spec, config.data.seq_len), "parameters": flops.param_count(spec),
          "final_loss": losses[-1], "step_time_spread": [min(times), max(times)]}


def main(argv):
  del argv
  config = _CONFIG.value
  device = jax.devices()[0]
  peaks = {dtype: metrics.measure_matmul_flops(dtype, size=1024, repeats=10) for dtype in ("float32", "bfloat16")}
  result = benchmark(config, _STEPS.value, _WARMUP.value)
  achieved = result["flops_per_token"] * result["tokens_per_sec"]
  result.update({"device": device.device_kind, "devices": jax.device_count(), "compute_dtype": config.model.dtype,
                 "matmul_peak_flops": peaks, "achieved_flops": achieved,
                 "mfu": {dtype: achieved / (peak * jax.device_count()) for dtype, peak in peaks.items()}})
  print(f"device {device.device_kind} x{jax.device_count()}; matmul peak f32 {peaks['float32'] / 1e9:.0f} GFLOP/s, "
        f"bf16->f32 {peaks['bfloat16'] / 1e9:.0f} GFLOP/s")
  print(f"{'config':<22} {'dtype':<9} {'params':>8} {'tokens/s':>9} {'step ms':>8} {'GFLOP/s':>8} "
        f"{'MFU f32':>8} {'MFU bf16':>8}")
  name = os.path.basename(config_flags.get_config_filename(flags.FLAGS["config"]))
  print(f"{name:<22} {config.model.dtype:<9} {result['parameters'] / 1e6:7.1f}M {result['tokens_per_sec']:9,.0f} "
        f"{result['step_time_s'] * 1e3:8.1f} {achieved / 1e9:8.1f} {result['mfu']['float32']:8.1%} "
        f"{result['mfu']['bfloat16']:8.1%}")
  with open(_OUT.value, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)


if __name__ == "__main__":
  app.run(main)
