"""Memory planner (LLMem's idea): per-device bytes of a config's training step on a mesh, before running it.

  python -m scripts.plan --config=configs/llama_1b.py --devices=8 --device_memory_gb=80 \
      [--config.mesh.fsdp=8 --config.mesh.data=1] [--config.model.remat=full] [--compile]

Parameters, gradients and optimizer state are counted exactly from the abstract train state and the shardings the
trainer would use (each leaf's shard shape on this mesh; optimizer state offloaded to host memory is reported apart).
Activations are an analytic estimate: the tensors each layer keeps for the backward pass under the remat policy
(`none`: every intermediate; `save_dots`: matmul outputs; `full`: only each layer's input, plus one layer recomputed
during the backward pass), the attention logits and probabilities (xla attention) or just the row statistics
(kernels), the float32 logits and their gradient, for this device's share of the batch (data/FSDP/expert split
the batch, tensor splits heads, MLP and vocabulary; a pipeline stage holds its layers for all micro-batches,
bubble ticks included), and under FSDP the all-gathered weights in flight.

`--compile` also lowers and compiles the real train step on `--devices` devices (simulated on CPU) and prints
XLA's own memory analysis next to the estimate. Prints a table and writes JSON.

`--topology=v5e:2x2` (with the `libtpu` wheel installed: `pip install -e ".[tpu]"`) plans for that Cloud TPU slice
from any machine: the mesh is laid over the slice's devices (`jax.experimental.topologies`), the train step is
compiled for TPU ahead of time, and the table adds XLA's compiled peak per chip, whether it fits the chip's HBM
(`TPU_CHIPS`), and XLA's estimated step time (the compiled cost analysis' `optimal_seconds`) beside an analytic
one (the step's FLOPs at the chip's peak bf16 rate).

  python -m scripts.plan --config=configs/llama_1b.py --topology=v5p:2x2x2 --config.mesh.fsdp=-1 \
      --config.mesh.data=1 --compile

`--decode_batch=B` adds inference on one device: the weights and the KV cache of B sequences at full context
(`--decode_context`, default model.max_len), resident and with each `model/offload.py` setting (weights and/or KV
cache in host memory, two layers in flight on the device), device and host bytes per setting.

  python -m scripts.plan --config=configs/llama_1b.py --decode_batch=8 --device_memory_gb=16

`--serve_slots=S` (with `--topology` and `--compile`) compiles the serving engine's own jitted steps for one chip of
the slice: the decode step of S slots and the mixed-batch step (prompt rows beside the decodes), over a page pool
for every slot at full context; it prints XLA's argument and temporary bytes, bytes accessed and estimated time.

  python -m scripts.plan --config=configs/llama_1b.py --topology=v5e:1x1 --compile --serve_slots=16
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time

_DEVICES_FLAG = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--devices=")), None)
if _DEVICES_FLAG and "jax" not in sys.modules:  # simulated devices must be requested before jax starts
  os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={_DEVICES_FLAG}")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs import base  # noqa: E402
from infer import engine as engine_lib  # noqa: E402
from infer import generate  # noqa: E402
from infer import sampling  # noqa: E402
from model import flops as flops_lib  # noqa: E402
from model import offload as offload_lib  # noqa: E402
from model import transformer  # noqa: E402
from model import pipeline as pipeline_lib  # noqa: E402
from model.transformer import ModelSpec  # noqa: E402
from train import setup as setup_lib  # noqa: E402

GB = 1e9
# device_kind -> (HBM bytes per chip, peak dense bf16 FLOP/s per chip), from Google's published TPU specifications
TPU_CHIPS = {"TPU v4": (32 * 2**30, 275e12), "TPU v5 lite": (16 * 2**30, 197e12), "TPU v5": (95 * 2**30, 459e12),
             "TPU v5p": (95 * 2**30, 459e12), "TPU v6 lite": (32 * 2**30, 918e12), "TPU v6e": (32 * 2**30, 918e12)}


def topology_devices(name: str) -> list:
  """The devices of the Cloud TPU slice `name` (e.g. "v5e:2x2", "v5p:2x2x2"), compiled for without a TPU; ValueError
  naming the flag when libtpu is not installed or the name is unknown."""
  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
  except Exception as e:  # no libtpu (RuntimeError/ValueError from the plugin loader), or an unknown topology
    raise ValueError(f"--topology={name!r}: cannot describe this TPU slice ({type(e).__name__}: {str(e)[:200]}); "
                     "install the TPU compiler with `pip install -e \".[tpu]\"` and use names such as v5e:2x2, "
                     "v5p:2x2x2, v4:2x2x1, v6e:2x2") from None


def tpu_compile(config, devices) -> dict:
  """Compiles the train step of `config` for the TPU `devices` (`topology_devices`): XLA's per-chip memory (argument,
  output, temp, peak), whether it fits the chip's HBM, XLA's estimated step time and the analytic one."""
  config = config.copy_and_resolve_references()
  config.model.matmul_impl = "xla"  # the native CPU kernels are host code; TPU runs XLA's dots
  setup = setup_lib.build(base.validate(config), devices)
  kind = devices[0].device_kind
  hbm, peak_flops = TPU_CHIPS.get(kind, (0, 0.0))
  start = time.perf_counter()
  try:
    compiled = setup.compile()
  except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses programs that cannot fit the chip's HBM
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return {"device_kind": kind, "chips": len(devices), "compile_s": time.perf_counter() - start, "fits": False,
            "hbm": hbm, "refused": str(e).split("\n")[0][:300]}
  seconds = time.perf_counter() - start
  m = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  peak = int(getattr(m, "peak_memory_in_bytes", 0)) or (m.argument_size_in_bytes + m.output_size_in_bytes
                                                         - m.alias_size_in_bytes + m.temp_size_in_bytes)
  tokens = config.train.batch_size * config.data.seq_len
  flops = flops_lib.flops_per_token(setup.spec, config.data.seq_len) * tokens
  return {"device_kind": kind, "chips": len(devices), "compile_s": seconds, "argument": m.argument_size_in_bytes,
          "output": m.output_size_in_bytes, "temp": m.temp_size_in_bytes, "alias": m.alias_size_in_bytes,
          "peak": peak, "hbm": hbm, "fits": bool(hbm) and peak <= hbm,
          "xla_step_s": _positive_or_nan(cost.get("optimal_seconds") if cost else None),
          "xla_flops_per_chip": float(cost.get("flops", float("nan"))) if cost else float("nan"),
          "mosaic_kernels": compiled.as_text().count("tpu_custom_call"),  # Pallas TPU kernels in the program
          "analytic_step_s": flops / (peak_flops * len(devices)) if peak_flops else float("nan")}


def _shard_bytes(tree, shardings) -> tuple[int, int]:
  """(device bytes, host bytes) of one device's shards of `tree`."""
  device = host = 0
  for leaf, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    n = math.prod(sh.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
    if getattr(sh, "memory_kind", None) == "pinned_host":
      host += n
    else:
      device += n
  return device, host


def activation_bytes(spec: ModelSpec, config, mesh_shape: dict[str, int]) -> dict[str, float]:
  """Analytic per-device activation bytes of one forward+backward pass (see the module docstring)."""
  t = config.train
  batch_shards = mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1) * mesh_shape.get("expert", 1)
  tp = mesh_shape.get("tensor", 1)
  stages = mesh_shape.get("pipeline", 1)
  seq = config.data.seq_len
  tokens = t.batch_size // t.grad_accum_steps / batch_shards * seq  # this device's tokens per pass
  c = jnp.dtype(spec.compute_dtype).itemsize
  d, hd = spec.embed_dim, spec.head_dim
  h, k, f, v = spec.num_heads / tp, spec.num_kv_heads / tp, spec.mlp_dim / tp, spec.vocab_size / tp
  gated = spec.activation in ("swiglu", "geglu")
  # Bytes per token per layer. `every` counts what XLA keeps without remat: residual stream, norm inputs, statistics
  # and outputs (~10 D), q/k/v and attention outputs, the MLP's pre-activations, activation-function intermediates
  # and outputs (~5 F, 6 F gated), and float32 attention logits and probabilities (xla attention) or row statistics.
  attn = 2 * 4 * h * seq if spec.attention_impl == "xla" else 2 * 4 * h
  qkv, attn_out = (h + 2 * k) * hd * c, h * hd * c
  every = 10 * d * c + qkv + attn_out + (6 if gated else 5) * f * c + attn
  # save_dots keeps the layer input and every matmul output (q/k/v, logits, attention output, both projections).
  dots = d * c + qkv + attn / 2 + attn_out + d * c + (2 if gated else 1) * f * c + d * c
  per_layer_token = {"none": every, "save_dots": dots, "full": 2 * d * c}[spec.remat]
  layers = spec.num_layers / stages
  saved = per_layer_token * layers * tokens
  pipeline_extra = 0.0
  if stages > 1:  # GPipe: bubble ticks also keep activations, and each tick saves the schedule's carries
    micro = pipeline_lib.default_microbatches(stages, spec.pipeline_microbatches)
    ticks = micro + stages - 1
    pipeline_extra = saved * (stages - 1) / micro + ticks * tokens * (1 + 1 / micro) * d * c
  # The backward pass recomputes one layer at a time; about half of what it recomputes is live at once.
  recompute = {"none": 0.0, "save_dots": 0.5 * (every - dots), "full": 0.5 * every}[spec.remat] * tokens
  logits = 2 * tokens * v * 4  # float32 logits and their gradient
  embed = 3 * tokens * d * c  # embeddings, final norm input and output
  return {"layers": saved, "recompute": recompute, "logits": logits, "embed": embed, "pipeline": pipeline_extra,
          "total": saved + recompute + logits + embed + pipeline_extra}


def plan(config, devices=None, device_memory_gb: float = 0.0) -> dict:
  """The estimate for `config` on `devices` (default: all): bytes per device by category, and whether it fits."""
  setup = setup_lib.build(config, devices)
  spec, abstract_state, state_sh, mesh = setup.spec, setup.abstract_state, setup.state_shardings, setup.mesh
  params, _ = _shard_bytes(abstract_state["params"], state_sh["params"])  # the trained ones (a LoRA run's adapters)
  frozen = _shard_bytes(abstract_state["frozen"], state_sh["frozen"])[0] if "frozen" in abstract_state else 0
  opt_device, opt_host = _shard_bytes(abstract_state["opt_state"], state_sh["opt_state"])
  grads = params  # one gradient per trained parameter shard, in the parameter dtype
  acts = activation_bytes(spec, config, dict(mesh.shape))
  fsdp = dict(mesh.shape).get("fsdp", 1)
  if fsdp > 1:  # FSDP all-gathers weights before use: two layers' worth in flight, plus embedding and head
    blocks, _ = _shard_bytes(abstract_state["params"]["blocks"], state_sh["params"]["blocks"])
    if frozen:
      blocks += _shard_bytes(abstract_state["frozen"]["blocks"], state_sh["frozen"]["blocks"])[0]
    rest = params + frozen - blocks
    per_layer = blocks / (spec.num_layers / dict(mesh.shape).get("pipeline", 1))
    acts["fsdp_gathered"] = fsdp * (rest + min(2, spec.num_layers) * per_layer)
    acts["total"] += acts["fsdp_gathered"]
  batch = 5 * 4 * config.train.batch_size * config.data.seq_len / max(
      1, dict(mesh.shape).get("data", 1) * dict(mesh.shape).get("fsdp", 1) * dict(mesh.shape).get("expert", 1))
  total = params + frozen + grads + opt_device + acts["total"] + batch
  stages = dict(mesh.shape).get("pipeline", 1)
  out = {"mesh": {k: int(v) for k, v in mesh.shape.items()}, "devices": mesh.size, "remat": spec.remat,
         "params": params, "frozen": frozen, "grads": grads, "optimizer": opt_device, "optimizer_host": opt_host,
         "activations": acts["total"], "activation_parts": acts, "batch": batch, "total": total,
         "pipeline_bubble_fraction": pipeline_lib.bubble_fraction(
             stages, pipeline_lib.default_microbatches(stages, spec.pipeline_microbatches))}
  if device_memory_gb:
    out["device_memory"] = device_memory_gb * GB
    out["fits"] = total <= device_memory_gb * GB
  return out


def decode_plan(spec: ModelSpec, batch: int, context: int, device_memory_gb: float = 0.0) -> list[dict]:
  """Inference bytes on one device for each offload setting (`model/offload.py`): the weights (the per-layer blocks
  and the rest: embedding, head, final norm) and a KV cache of `batch` sequences of `context` tokens in the compute
  dtype. Offloaded parts live in host memory with two layers' worth on the device (the one running and the one being
  copied in). Returns one row per setting: offload, device bytes, host bytes, fits (when device_memory_gb > 0)."""
  params = jax.eval_shape(lambda: transformer.init_params(spec, 0))
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
  blocks = nbytes(params["blocks"])
  rest = nbytes(params) - blocks
  kv = 2 * spec.num_layers * batch * context * spec.num_kv_heads * spec.head_dim * jnp.dtype(spec.compute_dtype).itemsize
  in_flight = min(2, spec.num_layers) / spec.num_layers
  rows = []
  for setting in offload_lib.OFFLOADS:
    parts = offload_lib.parts(setting)
    host = (blocks if "weights" in parts else 0) + (kv if "kv" in parts else 0)
    device = rest + (blocks * in_flight if "weights" in parts else blocks) + (kv * in_flight if "kv" in parts else kv)
    row = {"offload": setting, "device": device, "host": host, "weights": rest + blocks, "kv_cache": kv}
    if device_memory_gb:
      row["fits"] = device <= device_memory_gb * GB
    rows.append(row)
  return rows


def lower_decode(spec: ModelSpec, device, batch: int, prompt_len: int, new_tokens: int, offload: str,
                 ahead: bool = True):
  """`infer.generate`'s prefill + decode program lowered for one (TPU) `device` from abstract arguments, with
  `offload` applied (the blocks' weights as host-memory arguments for "weights", copied in one layer `ahead` or
  not: `offload.place`). `model.matmul_impl=pallas` is kept
  (the Mosaic int8 kernels on TPU); auto and native mean this host's CPU kernels, which a TPU program cannot carry,
  so they lower as xla."""
  matmul_impl = spec.matmul_impl if spec.matmul_impl == "pallas" else "xla"
  spec = dataclasses.replace(spec, offload=offload, offload_ahead=ahead, matmul_impl=matmul_impl)
  model = nnx.eval_shape(lambda: transformer.Transformer(spec, rngs=nnx.Rngs(params=0)).unstacked())
  if "weights" in offload_lib.parts(offload):  # 8-bit weights as 32-bit words on the host, as `offload.place` does
    model = offload_lib.pack_blocks(model)
  args, kwargs = generate._prepare(model, [[1] * prompt_len] * batch, new_tokens, 0.0, 0, 1.0, 0, None)
  on_device = jax.sharding.SingleDeviceSharding(device)
  on_host = jax.sharding.SingleDeviceSharding(device, memory_kind=offload_lib.HOST_KIND)

  def abstract(path, x):
    host = "weights" in offload_lib.parts(offload) and jax.tree_util.keystr(path).startswith("['blocks']")
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=on_host if host else on_device)

  state = jax.tree_util.tree_map_with_path(abstract, args[1])
  rest = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype, sharding=on_device), args[2:])
  return generate._generate_padded.lower(args[0], state, *rest, **kwargs)


def tpu_decode_memory(spec: ModelSpec, device, batch: int, prompt_len: int, new_tokens: int, offload: str,
                      ahead: bool = True) -> dict:
  """`lower_decode` compiled for a TPU device (`topology_devices`): XLA's memory analysis in bytes, device arguments
  and temporaries, host arguments and temporaries."""
  m = lower_decode(spec, device, batch, prompt_len, new_tokens, offload, ahead).compile().memory_analysis()
  return {name: int(getattr(m, f"{name}_size_in_bytes")) for name in
          ("argument", "temp", "host_argument", "host_temp")}


def lower_serve_steps(spec: ModelSpec, device, slots: int, page_size: int = 16) -> dict:
  """The serving engine's jitted steps (`infer/engine.py`) lowered for one (TPU) `device` from abstract arguments, with
  a page pool for every slot at full context: "decode" (one token per slot, the whole page table) and "mixed" (the
  default mixed-batch budget of prompt rows beside the decodes). Returns {name: jax Lowered}."""
  spec = dataclasses.replace(spec, matmul_impl="xla")
  model = nnx.eval_shape(lambda: transformer.Transformer(spec, rngs=nnx.Rngs(params=0)).unstacked())
  graphdef, state = nnx.split(model)
  max_pages = math.ceil(spec.max_len / page_size)
  on_device = jax.sharding.SingleDeviceSharding(device)
  put = lambda tree: jax.tree.map(  # noqa: E731
      lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=on_device), tree)
  pages = put(jax.eval_shape(lambda: model.init_pages(slots * max_pages + 1, page_size)))
  ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=on_device)  # noqa: E731
  settings = lambda rows: put(jax.eval_shape(  # noqa: E731
      lambda: sampling.row_settings([sampling.SamplingParams()] * rows)))
  decode = (ints(slots, 1), ints(slots, 1), ints(slots, 1), ints(slots, max_pages), ints(slots))
  rows, width = -(-min(engine_lib.MIXED_STEP_TOKENS, spec.max_len) // 32), 32
  prefill = (ints(rows, width), ints(rows, width), ints(rows, width), ints(rows, max_pages), ints(rows), ints(rows))
  return {"decode": engine_lib._step.lower(graphdef, put(state), pages, *decode, ints(slots), ints(slots),
                                           settings(slots), ints(slots)),
          "mixed": engine_lib._mixed_step.lower(graphdef, put(state), pages, (prefill, (*decode, ints(slots))),
                                                ints(rows + slots), settings(rows + slots))}


def tpu_serve_steps(spec: ModelSpec, device, slots: int, page_size: int = 16) -> dict:
  """`lower_serve_steps` compiled for a TPU chip: per step, XLA's argument / output / temporary bytes, its estimated
  time (`optimal_seconds`) and the analytic floor (weights and the whole KV pool read once at the chip's HBM
  bandwidth: `TPU_CHIPS` has no bandwidth, so bytes are reported and the estimate is XLA's)."""
  out = {}
  for name, lowered in lower_serve_steps(spec, device, slots, page_size).items():
    start = time.perf_counter()
    compiled = lowered.compile()
    m, cost = compiled.memory_analysis(), compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    out[name] = {"compile_s": time.perf_counter() - start, "argument": int(m.argument_size_in_bytes),
                 "output": int(m.output_size_in_bytes), "alias": int(m.alias_size_in_bytes),
                 "temp": int(m.temp_size_in_bytes),
                 "xla_step_s": _positive_or_nan(cost.get("optimal_seconds") if cost else None),
                 "xla_bytes_accessed": float(cost.get("bytes accessed", float("nan"))) if cost else float("nan")}
  return out


def compiled_memory(config, devices=None) -> dict:
  """XLA's memory analysis of the compiled train step: per-device argument, output, alias and temp bytes, and
  their peak (arguments + outputs - aliased + temporaries)."""
  compiled = setup_lib.build(config, devices).compile()
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = {name: int(getattr(m, f"{name}_size_in_bytes")) for name in ("argument", "output", "alias", "temp")}
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def _fmt(n: float) -> str:
  return f"{n / GB:9.3f} GB" if n >= 0.1 * GB else f"{n / 1e6:9.2f} MB"


def _positive_or_nan(value) -> float:
  """XLA's cost model reports optimal_seconds <= 0 where it has no estimate (seen with full remat): NaN then."""
  return float(value) if value is not None and float(value) > 0 else float("nan")


def _print_tpu(topology: str, tpu: dict, result: dict) -> None:
  if "refused" in tpu:
    print(f"  does NOT fit {topology} ({tpu['chips']} x {tpu['device_kind']}): XLA's TPU compiler says "
          f"{tpu['refused']}")
    return
  print(f"  compiled for {topology} ({tpu['chips']} x {tpu['device_kind']}) in {tpu['compile_s']:.1f} s: "
        f"peak {_fmt(tpu['peak']).strip()} per chip of {_fmt(tpu['hbm']).strip()} HBM: "
        f"{'fits' if tpu['fits'] else 'does NOT fit'}; estimate / compiled peak {result['total'] / tpu['peak']:.2f}")
  xla = "not reported" if math.isnan(tpu["xla_step_s"]) else f"{tpu['xla_step_s'] * 1e3:.2f} ms"
  print(f"  step time: XLA's estimate {xla}, analytic (FLOPs at peak bf16) {tpu['analytic_step_s'] * 1e3:.2f} ms")


def main(argv):
  del argv
  f = flags.FLAGS
  config = base.validate(f.config)
  devices = jax.devices()[:f.devices] if f.devices else None
  if f.topology:
    try:
      devices = topology_devices(f.topology)
    except ValueError as e:
      sys.exit(f"error: {e}")
    if config.model.matmul_impl != "pallas":  # auto/native are this host's CPU kernels; pallas is Mosaic on TPU
      config.model.matmul_impl = "xla"
  result = plan(config, devices, f.device_memory_gb)
  rows = [("parameters", result["params"]), ("frozen base (LoRA)", result["frozen"]), ("gradients", result["grads"]),
          ("optimizer state", result["optimizer"]),
          ("activations", result["activations"]), ("batch", result["batch"]), ("total (estimate)", result["total"])]
  print(f"mesh {result['mesh']} ({result['devices']} devices), remat={result['remat']}, per device:")
  for name, value in rows:
    print(f"  {name:<18} {_fmt(value)}")
  if result["optimizer_host"]:
    print(f"  {'optimizer (host)':<18} {_fmt(result['optimizer_host'])}")
  if "fits" in result:
    print(f"  fits in {f.device_memory_gb:g} GB per device: {'yes' if result['fits'] else 'NO'} "
          f"({100 * result['total'] / result['device_memory']:.0f}% used)")
  if f.compile and config.model.quant != "none":  # int8 / packed weights have no gradients: inference only
    print(f"  train step not compiled: model.quant={config.model.quant!r} is for inference (--decode_batch, "
          "--serve_slots)")
  elif f.compile and f.topology:
    result["tpu"] = tpu = tpu_compile(config, devices)
    _print_tpu(f.topology, tpu, result)
  elif f.compile:
    result["compiled"] = compiled = compiled_memory(config, devices)
    if compiled:
      print("  compiled step (XLA memory analysis): " + ", ".join(f"{k} {_fmt(v).strip()}" for k, v in
                                                                  compiled.items()))
      print(f"  estimate / compiled peak: {result['total'] / compiled['peak']:.2f}")
  if f.decode_batch:
    spec = ModelSpec.from_config(config.model)
    context = f.decode_context or spec.max_len
    result["decode"] = rows = decode_plan(spec, f.decode_batch, context, f.device_memory_gb)
    print(f"inference on one device, batch {f.decode_batch} x {context} tokens of KV cache "
          f"(weights {_fmt(rows[0]['weights']).strip()}, KV cache {_fmt(rows[0]['kv_cache']).strip()}):")
    for row in rows:
      fits = "" if "fits" not in row else f"  fits in {f.device_memory_gb:g} GB: {'yes' if row['fits'] else 'NO'}"
      print(f"  offload={row['offload']:<11} device {_fmt(row['device'])}  host {_fmt(row['host'])}{fits}")
      if f.compile and f.topology:  # XLA's own figures for generate's program on one chip of the slice
        row["tpu_compiled"] = m = tpu_decode_memory(spec, devices[0], f.decode_batch, context // 4,
                                                    context - context // 4, row["offload"])
        print(f"    compiled for {devices[0].device_kind}: device arguments {_fmt(m['argument']).strip()}, temporaries "
              f"{_fmt(m['temp']).strip()}; host arguments {_fmt(m['host_argument']).strip()}, temporaries "
              f"{_fmt(m['host_temp']).strip()}")
        if "weights" in offload_lib.parts(row["offload"]):  # and with one layer in flight (--offload_ahead=false)
          row["tpu_compiled_one_in_flight"] = m = tpu_decode_memory(
              spec, devices[0], f.decode_batch, context // 4, context - context // 4, row["offload"], ahead=False)
          print(f"    one layer in flight (no copy ahead): temporaries {_fmt(m['temp']).strip()}")
  if f.serve_slots:
    if not (f.compile and f.topology):
      sys.exit("error: --serve_slots compiles the serving engine's steps for a TPU chip: give --topology and --compile")
    spec = ModelSpec.from_config(config.model)
    result["serve"] = steps = tpu_serve_steps(spec, devices[0], f.serve_slots)
    print(f"serving engine, {f.serve_slots} slots, page pool for every slot at {spec.max_len} tokens, compiled for one "
          f"{devices[0].device_kind}:")
    for name, m in steps.items():
      xla = "not reported" if math.isnan(m["xla_step_s"]) else f"{m['xla_step_s'] * 1e3:.3f} ms"
      print(f"  {name:<7} arguments {_fmt(m['argument']).strip()}, temporaries {_fmt(m['temp']).strip()}, "
            f"bytes accessed {_fmt(m['xla_bytes_accessed']).strip()}; XLA's step estimate {xla} "
            f"(compiled in {m['compile_s']:.1f} s)")
  with open(f.out, "w", encoding="utf-8") as fh:
    json.dump(result, fh, indent=1, default=float)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config to plan.")
  flags.DEFINE_integer("devices", 0, "Devices to plan for (0: all; on CPU they are simulated).")
  flags.DEFINE_float("device_memory_gb", 0.0, "Per-device memory to check the total against (0: no check).")
  flags.DEFINE_bool("compile", False, "Also compile the step and print XLA's memory analysis.")
  flags.DEFINE_string("topology", "", "Plan (and with --compile, compile) for this Cloud TPU slice, e.g. v5e:2x2 "
                      "or v5p:2x2x2 (needs libtpu: pip install -e '.[tpu]').")
  flags.DEFINE_integer("decode_batch", 0, "Also plan inference of this many sequences on one device, resident and "
                       "offloaded (0: no).")
  flags.DEFINE_integer("decode_context", 0, "--decode_batch: KV-cache tokens per sequence (0: model.max_len).")
  flags.DEFINE_integer("serve_slots", 0, "With --topology and --compile: also compile the serving engine's decode "
                       "and mixed-batch steps for this many slots on one chip (0: no).")
  flags.DEFINE_string("out", "plan.json", "Where to write the JSON result.")
  app.run(main)
