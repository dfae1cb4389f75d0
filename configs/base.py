"""Every default of peakllm, one documented line each, and the one `validate` that checks them.

Presets (`tiny.py`, `default.py`, ...) start from `get_config()` and override a few keys. Any key can be overridden on
the command line: `python -m train --config=configs/tiny.py --config.model.num_layers=4`.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import ml_collections

FAMILIES = ("gpt", "llama")  # gpt: GPT-2/OPT (learned positions, LayerNorm, GELU, biases); llama: RoPE, RMSNorm, SwiGLU
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_no_batch", "save_attention_out")
ATTENTION_IMPLS = ("xla", "pallas", "cudnn")  # reference jnp path, our Pallas flash kernel, cuDNN (NVIDIA GPUs)
QUANT_MODES = ("none", "int8_weight", "w8a8", "packed")  # float, W8A16, W8A8 (SmoothQuant), infer.compress codes
HEAD_QUANTS = ("none", "int8")  # quant=packed: the embedding and head float, or int8 rows (W8A16)
NONFINITE = ("skip", "stop")  # train.nonfinite
MATMUL_IMPLS = ("auto", "xla", "pallas", "native")  # auto: native CPU kernels where built and suited, else XLA
PACKED_BITS = (2, 3, 4, 8)
OPTIMIZERS = ("adamw", "adafactor", "lion")
MESH_AXES = ("data", "fsdp", "tensor", "pipeline", "expert")  # the same names as model/sharding.py
SCHEDULES = ("cosine", "linear", "constant")
ACTIVATIONS = ("gelu", "gelu_exact", "relu", "silu")  # gelu is the tanh approximation (GPT-2's gelu_new)
NORM_POSITIONS = ("pre", "post")  # pre: x + f(norm(x)) (GPT-2, Llama); post: norm(x + f(x)) (OPT-350m), no final norm
ROPE_SCALINGS = ("none", "llama3")
LORA_TARGETS = ("q", "k", "v", "o", "mlp_in", "mlp_gate", "mlp_out")  # train.lora.targets: the adapted linear layers
LORA_BASE_QUANTS = ("none", "int8", "int4")  # train.lora.base_quant: the frozen base float, int8 (W8A16) or 4-bit
# codes (round-to-nearest, groups of 64 inputs, the packed format of infer.compress): QLoRA


def check_implemented(key: str, allowed: tuple[str, ...], table) -> None:
  """For the module that implements a choice: RuntimeError at import unless its `table` covers exactly the names
  `validate` allows for `key`, so the allowed values are written once (above) and never drift from the code."""
  if set(allowed) != set(table):
    raise RuntimeError(f"config.{key}: validate allows {sorted(allowed)} but the implementation has {sorted(table)}")


def get_config() -> ml_collections.ConfigDict:
  """Returns the full default config (a small GPT-2-style model on the embedded stdlib corpus)."""
  c = ml_collections.ConfigDict()

  c.model = m = ml_collections.ConfigDict()
  m.family = "gpt"  # one of FAMILIES
  m.vocab_size = 8192  # tokenizer and embedding size; a trained tokenizer gets exactly this many entries
  m.num_layers = 6  # decoder blocks
  m.embed_dim = 384  # model width d_model
  m.num_heads = 6  # query heads; must divide embed_dim unless head_dim is set
  m.num_kv_heads = 0  # key/value heads for grouped-query attention; 0 means num_heads (multi-head attention)
  m.head_dim = 0  # per-head width; 0 means embed_dim // num_heads
  m.mlp_dim = 0  # hidden width of the MLP; 0 means 4 * embed_dim (gpt) or the Llama 8/3 rule rounded to 256
  m.max_len = 256  # longest sequence (learned position table size; RoPE cache length)
  m.activation = "gelu"  # MLP nonlinearity for gpt (llama always uses SwiGLU with silu)
  m.norm_eps = 1e-5  # epsilon of LayerNorm / RMSNorm
  m.rope_theta = 10000.0  # RoPE base frequency (llama family)
  m.rope_scaling = "none"  # one of ROPE_SCALINGS: llama3 stretches the low RoPE frequencies (Llama 3.1 and later)
  m.rope_scaling_factor = 8.0  # llama3: how much the low frequencies are divided by
  m.rope_low_freq_factor = 1.0  # llama3: wavelengths above original_max_len / this are fully scaled
  m.rope_high_freq_factor = 4.0  # llama3: wavelengths below original_max_len / this are left as they are
  m.rope_original_max_len = 8192  # llama3: the context length the model was pretrained with
  m.norm_position = "pre"  # one of NORM_POSITIONS
  m.embed_proj_dim = 0  # width of the token embedding when it differs from embed_dim (OPT-350m: 512); 0 = embed_dim
  m.tie_embeddings = True  # share the token embedding with the output projection
  m.use_bias = -1  # biases in attention projections: 1 yes, 0 no, -1 family default (gpt yes, llama no)
  m.mlp_bias = -1  # biases in the MLP: 1 yes, 0 no, -1 same as use_bias
  m.param_dtype = "float32"  # storage dtype of parameters
  m.dtype = "float32"  # compute dtype of matmuls; softmax, norms and the loss always run in float32
  m.matmul_dtype = ""  # operands of the linear layers' matmuls in both passes ("" = dtype), float32 accumulation:
  # bfloat16 with dtype float32 is PyTorch-autocast style (bf16 dot units, float32 elementwise work)
  m.remat = "none"  # activation recomputation policy, one of REMAT_POLICIES
  m.pipeline_microbatches = 0  # GPipe micro-batches per step when mesh.pipeline > 1 (0: 2 x stages)
  m.loss_chunk_tokens = 0  # training: output head + cross-entropy over chunks of this many tokens, recomputed in the
  # backward pass, so the [tokens, vocab] logits are never stored whole (0: all at once)
  m.scan_layers = True  # run the blocks with lax.scan (one compiled block) instead of unrolling them
  m.attention_impl = "xla"  # one of ATTENTION_IMPLS; kernels serve full-sequence causal attention, cache steps use xla
  m.init_std = 0.02  # normal init scale; residual output projections are scaled by 1/sqrt(2 * num_layers)
  m.quant = "none"  # one of QUANT_MODES; inference only, written by `python -m infer.quantize`
  m.matmul_impl = "auto"  # one of MATMUL_IMPLS: how quantized matmuls run (model/quant.py)
  m.quant_bits = 8  # quant=packed: bits per code, one of PACKED_BITS (set when a compressed workdir is loaded)
  m.quant_group_size = 0  # quant=packed: inputs per scale/zero group (0: one group per output channel)
  m.head_quant = "none"  # quant=packed: one of HEAD_QUANTS; "int8" serves the embedding and head as int8 rows with a
  # per-row scale, quantized at load (`--head_quant=int8` on infer.generate/evaluate/serve)
  m.num_experts = 0  # experts per MoE MLP (model/moe.py); 0 = a dense model
  m.experts_per_token = 1  # top-k routing: 1 = Switch, 2 = Mixtral
  m.expert_mlp_dim = 0  # hidden width of each expert; 0 means the dense mlp_dim rule
  m.moe_every = 1  # every moe_every-th block has the MoE MLP (1: all blocks, as Mixtral; 2: as Switch)
  m.capacity_factor = 0.0  # 0: dropless (grouped matmuls); > 0: per-expert buffers of ceil(cf * tokens * k / E)
  m.moe_renormalize = True  # renormalize the top-k router probabilities to sum to 1 (Mixtral); False: Switch

  c.data = d = ml_collections.ConfigDict()
  d.source = "stdlib"  # "stdlib" | "files:GLOB" | "tfds:NAME[:CONFIG]" | "sft:JSONL" (prompt/completion or chat
  # records, loss on the answers only: train/sft.py)
  d.data_dir = ""  # where tfds datasets are prepared; "" means ~/.cache/peakllm/tfds
  d.validation_fraction = 0.02  # share of documents (by path hash) held out for validation
  d.max_doc_bytes = 200_000  # longer documents are cut to this many bytes
  d.max_docs = 0  # cap on the files of a stdlib/files source (a stable sha1-of-path sample); 0 reads all
  d.tokenizer_path = ""  # an existing tokenizer.json; "" trains a byte-level BPE on the training split
  d.tokenizer_train_bytes = 8_000_000  # how many bytes of training text the BPE trainer reads
  d.seq_len = 256  # tokens per packed row
  d.shuffle_seed = 0  # seed of the document shuffle
  d.shuffle_window = 2048  # train chunks shuffled in windows of this many, so a long document spans many batches; 0/1 off
  d.num_workers = 0  # grain worker processes (0 reads in the main process)

  c.train = t = ml_collections.ConfigDict()
  t.init_from = ""  # a workdir whose latest parameters start this run instead of a random init (fine-tuning)
  t.seed = 0  # parameter init seed (and the train state's RNG key, reserved for stochastic layers)
  t.batch_size = 8  # sequences per optimizer step (global)
  t.grad_accum_steps = 1  # micro-batches per step; must divide batch_size
  t.steps = 1000  # optimizer steps
  t.optimizer = "adamw"  # one of OPTIMIZERS
  t.learning_rate = 1e-3  # peak learning rate
  t.min_lr_ratio = 0.1  # final learning rate as a fraction of the peak
  t.warmup_steps = 100  # linear warmup steps
  t.schedule = "cosine"  # decay after warmup, one of SCHEDULES
  t.b1 = 0.9  # first moment decay (adamw, lion)
  t.b2 = 0.95  # second moment decay (adamw, lion)
  t.eps = 1e-8  # adamw epsilon
  t.weight_decay = 0.1  # decoupled weight decay; never applied to biases, norms or embeddings
  t.grad_clip = 1.0  # global-norm clipping threshold; 0 disables
  t.z_loss = 0.0  # coefficient of the log(Z)^2 auxiliary loss (PaLM); 0 disables
  t.nonfinite = "skip"  # one of NONFINITE: a step whose loss or gradient norm is NaN/inf is never applied (the
  # parameters and optimizer state stay as they were, on device); "skip" goes on, "stop" ends the run at the next
  # log or checkpoint step without saving
  t.nonfinite_max_skips = 10  # nonfinite=skip: this many skipped steps in a row stop the run
  t.moe_aux_loss = 0.01  # coefficient of the MoE load-balancing loss (Switch); MoE models only
  t.offload_optimizer = False  # keep optimizer state in pinned host memory between steps (ZeRO-Offload)
  t.router_z_loss = 0.001  # coefficient of the MoE router z-loss (ST-MoE); MoE models only
  t.log_every = 10  # steps between metric rows
  t.eval_every = 200  # steps between evaluations; 0 evaluates only at the end
  t.eval_batches = 8  # validation batches per evaluation
  t.checkpoint_every = 200  # steps between checkpoints (a final one is always written)
  t.max_to_keep = 2  # checkpoints kept on disk
  t.async_checkpoint = True  # write checkpoints in a background thread
  t.progress_bar = True  # tqdm bar with ETA on stderr
  t.peak_flops = 0.0  # device peak FLOP/s for MFU; 0 measures a dense matmul at start-up (CPU) or uses a table
  t.profile_steps = ""  # "A:B": a jax.profiler trace of steps A..B into <workdir>/profile, top operations logged
  t.lora = lora = ml_collections.ConfigDict()  # LoRA / QLoRA fine-tuning (model/lora.py)
  lora.rank = 0  # 0: every parameter trains; > 0: adapters of this rank on lora.targets, every base weight frozen
  lora.alpha = 16.0  # the adapters' output is scaled by alpha / rank
  lora.dropout = 0.0  # dropout on the adapters' input while training
  lora.targets = "q,k,v,o,mlp_in,mlp_gate,mlp_out"  # comma-separated LORA_TARGETS (those the model has are adapted)
  lora.base_quant = "none"  # one of LORA_BASE_QUANTS: how the frozen base is stored (int8 / int4: QLoRA)

  c.mesh = mesh = ml_collections.ConfigDict()  # device mesh; -1 takes all remaining devices (at most one axis)
  mesh.data = -1  # data parallelism (batch split, parameters replicated)
  mesh.fsdp = 1  # fully sharded data parallelism (ZeRO-3): batch split, parameters and optimizer state split
  mesh.tensor = 1  # tensor (Megatron) parallelism: heads and MLP columns split
  mesh.pipeline = 1  # pipeline (GPipe) stages: the blocks split into contiguous stages, micro-batches flow through
  mesh.expert = 1  # expert parallelism: MoE experts split over devices (tokens too, like data parallelism)
  mesh.dcn = ml_collections.ConfigDict({a: 1 for a in MESH_AXES})  # sizes across slices/processes (multi-slice);
  # with any > 1 the sizes above are per slice (or per process off TPU) and each axis spans ICI x DCN devices

  c.distributed = dist = ml_collections.ConfigDict()  # multi-process runs (train/distributed.py)
  dist.initialize = False  # call jax.distributed.initialize before training (every process runs the same command)
  dist.coordinator_address = ""  # host:port of process 0; "" lets Cloud TPU / SLURM / Open MPI detect it
  dist.num_processes = 0  # 0: detected
  dist.process_id = -1  # -1: detected
  dist.cpu_collectives = "gloo"  # CPU cross-process collectives ("gloo" or "mpi")

  c.sample = s = ml_collections.ConfigDict()
  s.prompt = "def fibonacci("  # prompt of the sample printed at the end of training
  s.max_new_tokens = 64  # tokens generated for that sample
  s.temperature = 0.0  # 0 is greedy
  s.top_k = 0  # 0 disables top-k filtering
  s.top_p = 1.0  # 1 disables nucleus filtering
  return c


# What may differ when a run resumes in an existing workdir; every other key must equal the workdir's config.json
# (`config_changes`). Run length, logging, evaluation and checkpoint cadence, the mesh and processes, the sample, and
# implementation choices that change speed or memory but not the model or the data.
RESUME_MAY_CHANGE = ("train.steps", "train.log_every", "train.eval_every", "train.eval_batches",
                     "train.checkpoint_every", "train.max_to_keep", "train.async_checkpoint", "train.progress_bar",
                     "train.peak_flops", "train.profile_steps", "train.nonfinite", "train.nonfinite_max_skips",
                     "train.offload_optimizer", "data.num_workers", "data.data_dir",
                     "model.attention_impl", "model.remat", "model.scan_layers", "model.loss_chunk_tokens",
                     "model.pipeline_microbatches", "model.matmul_impl", "mesh", "distributed", "sample")


def flatten(tree, prefix: str = "") -> dict:
  """A nested dict -> {"a.b.c": leaf}."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    out.update(flatten(value, name + ".") if isinstance(value, dict) else {name: value})
  return out


def config_changes(old: ml_collections.ConfigDict, new: ml_collections.ConfigDict) -> list[tuple[str, Any, Any]]:
  """(key, old value, new value) for every key outside RESUME_MAY_CHANGE whose value differs (compared as JSON)."""
  a, b = (flatten(json.loads(c.to_json_best_effort())) for c in (old, new))
  allowed = lambda key: any(key == k or key.startswith(k + ".") for k in RESUME_MAY_CHANGE)  # noqa: E731
  return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if not allowed(k) and a.get(k) != b.get(k)]


def _fail(key: str, value, allowed: str):
  raise ValueError(f"config.{key}={value!r} is invalid: {allowed}")


def _choice(config, key: str, allowed: tuple[str, ...]):
  section, name = key.split(".")
  value = config[section][name]
  if value not in allowed:
    _fail(key, value, f"allowed values are {', '.join(allowed)}")


def _positive(config, key: str, zero_ok: bool = False):
  section, name = key.split(".")
  value = config[section][name]
  if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or (value == 0 and not zero_ok):
    _fail(key, value, "must be a number >= 0" if zero_ok else "must be a number > 0")


def profile_steps(config) -> tuple[int, int] | None:
  """config.train.profile_steps 'A:B' -> (A, B), the 1-based steps A..B inclusive; '' -> None; ValueError otherwise."""
  text = config.train.get("profile_steps", "")
  if not text:
    return None
  match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
  if not match or not 1 <= int(match[1]) <= int(match[2]):
    _fail("train.profile_steps", text, "use A:B with 1 <= A <= B (steps A to B inclusive), or '' for no profile")
  return int(match[1]), int(match[2])


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every key before anything compiles; raises ValueError naming the key, its value and what is allowed."""
  m, d, t = config.model, config.data, config.train
  for key, value in flatten(config.to_dict()).items():
    if isinstance(value, float) and not math.isfinite(value):
      _fail(key, value, "must be a finite number")
  _choice(config, "model.family", FAMILIES)
  _choice(config, "model.param_dtype", DTYPES)
  _choice(config, "model.dtype", DTYPES)
  _choice(config, "model.matmul_dtype", ("",) + DTYPES)
  _choice(config, "model.remat", REMAT_POLICIES)
  _choice(config, "model.attention_impl", ATTENTION_IMPLS)
  _choice(config, "model.activation", ACTIVATIONS)
  _choice(config, "model.norm_position", NORM_POSITIONS)
  _choice(config, "model.rope_scaling", ROPE_SCALINGS)
  _choice(config, "model.quant", QUANT_MODES)
  _choice(config, "model.matmul_impl", MATMUL_IMPLS)
  if m.quant == "packed" and m.quant_bits not in PACKED_BITS:
    _fail("model.quant_bits", m.quant_bits, f"allowed values are {PACKED_BITS}")
  _choice(config, "model.head_quant", HEAD_QUANTS)
  if m.head_quant != "none" and m.quant != "packed":
    _fail("model.head_quant", m.head_quant, "applies to compressed workdirs served packed (model.quant=packed); "
          f"model.quant={m.quant!r} (int8 formats already hold an int8 head)")
  _choice(config, "train.optimizer", OPTIMIZERS)
  _choice(config, "train.nonfinite", NONFINITE)
  profile_steps(config)
  _choice(config, "train.schedule", SCHEDULES)
  for key in ("model.vocab_size", "model.num_layers", "model.embed_dim", "model.num_heads", "model.max_len",
              "data.seq_len", "train.batch_size", "train.grad_accum_steps", "train.steps", "train.learning_rate",
              "train.log_every", "train.eval_batches", "train.checkpoint_every", "train.max_to_keep",
              "train.nonfinite_max_skips",
              "model.norm_eps", "model.rope_theta", "model.rope_scaling_factor", "model.rope_original_max_len"):
    _positive(config, key)
  for key in ("model.num_kv_heads", "model.head_dim", "model.mlp_dim", "train.warmup_steps", "train.weight_decay",
              "train.grad_clip", "train.z_loss", "train.eval_every", "data.num_workers", "train.peak_flops",
              "data.max_docs", "model.num_experts", "model.expert_mlp_dim", "model.capacity_factor",
              "train.moe_aux_loss", "train.router_z_loss", "model.embed_proj_dim", "model.loss_chunk_tokens",
              "model.quant_group_size"):
    _positive(config, key, zero_ok=True)
  if not m.head_dim and m.embed_dim % m.num_heads:
    _fail("model.num_heads", m.num_heads, f"must divide model.embed_dim={m.embed_dim} (or set model.head_dim)")
  if m.num_kv_heads and m.num_heads % m.num_kv_heads:
    _fail("model.num_kv_heads", m.num_kv_heads, f"must divide model.num_heads={m.num_heads}")
  for key in ("use_bias", "mlp_bias"):
    if m[key] not in (-1, 0, 1):
      _fail(f"model.{key}", m[key], "allowed values are -1 (default), 0, 1")
  if m.rope_scaling == "llama3" and not 0 < m.rope_low_freq_factor < m.rope_high_freq_factor:
    _fail("model.rope_high_freq_factor", m.rope_high_freq_factor,
          f"must exceed model.rope_low_freq_factor={m.rope_low_freq_factor} > 0")
  if m.family == "llama" and m.norm_position != "pre":
    _fail("model.norm_position", m.norm_position, "the llama family is pre-norm only")
  if m.family == "llama" and head_dim(m) % 2:
    _fail("model.head_dim", head_dim(m), "RoPE needs an even head dimension")
  if d.seq_len > m.max_len:
    _fail("data.seq_len", d.seq_len, f"must be <= model.max_len={m.max_len}")
  _validate_lora(config)
  if t.batch_size % t.grad_accum_steps:
    _fail("train.grad_accum_steps", t.grad_accum_steps, f"must divide train.batch_size={t.batch_size}")
  if t.warmup_steps > t.steps:
    _fail("train.warmup_steps", t.warmup_steps, f"must be <= train.steps={t.steps}")
  if not 0.0 <= t.min_lr_ratio <= 1.0:
    _fail("train.min_lr_ratio", t.min_lr_ratio, "must be in [0, 1]")
  for key in ("b1", "b2"):
    if not 0.0 <= t[key] < 1.0:
      _fail(f"train.{key}", t[key], "must be in [0, 1)")
  if not 0.0 < d.validation_fraction < 1.0:
    _fail("data.validation_fraction", d.validation_fraction, "must be in (0, 1)")
  src = d.source
  if not (src == "stdlib" or any(src.startswith(p) and len(src) > len(p) for p in ("files:", "tfds:", "sft:"))):
    _fail("data.source", src, "use 'stdlib', 'files:GLOB', 'tfds:NAME[:CONFIG]' or 'sft:JSONL' (fine-tuning records)")
  if src.startswith("sft:") and not d.tokenizer_path:
    _fail("data.tokenizer_path", d.tokenizer_path, "fine-tuning records (data.source='sft:...') need the model's "
          "tokenizer: start from a workdir with configs/finetune.py, or set data.tokenizer_path")
  sizes = [config.mesh[a] for a in MESH_AXES]
  if sum(v == -1 for v in sizes) > 1 or any(not isinstance(v, int) or v == 0 or v < -1 for v in sizes):
    _fail("mesh", {a: config.mesh[a] for a in MESH_AXES}, "each axis size must be a positive int, with at most one -1")
  dcn = config.mesh.dcn
  if any(not isinstance(dcn[a], int) or dcn[a] < 1 for a in MESH_AXES):
    _fail("mesh.dcn", dict(dcn), "each DCN size must be an int >= 1")
  stages = config.mesh.pipeline * dcn.pipeline
  if config.mesh.pipeline == -1:
    _fail("mesh.pipeline", -1, "give the number of pipeline stages explicitly")
  if stages > 1:
    if m.num_layers % stages:
      _fail("mesh.pipeline", stages, f"must divide model.num_layers={m.num_layers} (each stage holds L / stages layers)")
    if m.num_experts:
      _fail("mesh.pipeline", stages, "MoE models are not pipelined yet; use mesh.expert, data or fsdp")
    micro = m.pipeline_microbatches or 2 * stages
    per_pass = config.train.batch_size // config.train.grad_accum_steps
    if m.pipeline_microbatches < 0 or per_pass % micro:
      _fail("model.pipeline_microbatches", m.pipeline_microbatches,
            f"must be >= 0 and its value ({micro}) must divide the {per_pass} sequences of each forward pass")
  if config.mesh.expert != 1 and not m.num_experts:
    _fail("mesh.expert", config.mesh.expert, "expert parallelism needs an MoE model (model.num_experts > 0)")
  if m.num_experts:
    if not 1 <= m.experts_per_token <= m.num_experts:
      _fail("model.experts_per_token", m.experts_per_token, f"must be in [1, model.num_experts={m.num_experts}]")
    if m.moe_every < 1 or m.num_layers % m.moe_every:
      _fail("model.moe_every", m.moe_every, f"must be >= 1 and divide model.num_layers={m.num_layers}")
    if config.mesh.expert > 1 and m.num_experts % config.mesh.expert:
      _fail("mesh.expert", config.mesh.expert, f"must divide model.num_experts={m.num_experts}")
    if m.quant != "none":
      _fail("model.quant", m.quant, "int8 formats cover dense models; compress MoE models with infer.compress.qmoe")
  dist = config.distributed
  if dist.cpu_collectives not in ("gloo", "mpi"):
    _fail("distributed.cpu_collectives", dist.cpu_collectives, "allowed values are gloo, mpi")
  if dist.num_processes < 0 or dist.process_id < -1 or (dist.num_processes and dist.process_id >= dist.num_processes):
    _fail("distributed.process_id", dist.process_id, f"must be -1 (detected) or in [0, distributed.num_processes="
          f"{dist.num_processes})")
  if not 0.0 < config.sample.top_p <= 1.0:
    _fail("sample.top_p", config.sample.top_p, "must be in (0, 1]")
  if config.sample.temperature < 0 or config.sample.top_k < 0 or config.sample.max_new_tokens < 0:
    _fail("sample", dict(config.sample), "temperature, top_k and max_new_tokens must be >= 0")
  return config


def lora_targets(lora: ml_collections.ConfigDict) -> tuple[str, ...]:
  """train.lora.targets as a tuple of names (order and spaces ignored, duplicates dropped)."""
  names = [n.strip() for n in str(lora.targets).split(",") if n.strip()]
  return tuple(sorted(set(names), key=LORA_TARGETS.index if set(names) <= set(LORA_TARGETS) else str))


def _validate_lora(config) -> None:
  lora, m = config.train.lora, config.model
  if not isinstance(lora.rank, int) or isinstance(lora.rank, bool) or lora.rank < 0:
    _fail("train.lora.rank", lora.rank, "must be an int >= 0 (0 trains every parameter)")
  if lora.base_quant not in LORA_BASE_QUANTS:
    _fail("train.lora.base_quant", lora.base_quant, f"allowed values are {', '.join(LORA_BASE_QUANTS)}")
  if not lora.rank:
    if lora.base_quant != "none":
      _fail("train.lora.base_quant", lora.base_quant, "QLoRA needs adapters: set train.lora.rank > 0")
    return
  if not lora.alpha > 0:
    _fail("train.lora.alpha", lora.alpha, "must be a number > 0")
  if not 0.0 <= lora.dropout < 1.0:
    _fail("train.lora.dropout", lora.dropout, "must be in [0, 1)")
  targets = lora_targets(lora)
  unknown = [n for n in targets if n not in LORA_TARGETS]
  if unknown or not targets:
    _fail("train.lora.targets", lora.targets, f"must name one or more of {', '.join(LORA_TARGETS)} (comma-separated)")
  if m.quant != "none":
    _fail("model.quant", m.quant, "LoRA trains on a float model section; a quantized frozen base is "
          "train.lora.base_quant (QLoRA)")
  if lora.base_quant == "int4":
    sizes = {"q/k/v": num_kv_heads(m) * head_dim(m), "o and q": m.num_heads * head_dim(m), "mlp": mlp_dim(m),
             "embed": m.embed_dim}
    bad = {k: v for k, v in sizes.items() if v % 64}
    if bad:
      _fail("train.lora.base_quant", "int4", f"the 4-bit base needs every linear layer's width to be a multiple of 64 "
            f"(groups of 64 inputs, 64-column tiles); this model has {bad}: use int8")


def head_dim(m: ml_collections.ConfigDict) -> int:
  """Per-head width: model.head_dim, or embed_dim // num_heads when that is 0."""
  return m.head_dim or m.embed_dim // m.num_heads


def num_kv_heads(m: ml_collections.ConfigDict) -> int:
  return m.num_kv_heads or m.num_heads


def mlp_dim(m: ml_collections.ConfigDict) -> int:
  """MLP hidden width: model.mlp_dim, or 4*d (gpt) / the Llama rule 8d/3 rounded up to a multiple of 256."""
  if m.mlp_dim:
    return m.mlp_dim
  if m.family == "gpt":
    return 4 * m.embed_dim
  return 256 * -(-(8 * m.embed_dim // 3) // 256)


def use_bias(m: ml_collections.ConfigDict) -> bool:
  return bool(m.use_bias) if m.use_bias != -1 else m.family == "gpt"


def mlp_bias(m: ml_collections.ConfigDict) -> bool:
  return bool(m.mlp_bias) if m.mlp_bias != -1 else use_bias(m)
