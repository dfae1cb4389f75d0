"""Compressed checkpoints: a workdir that `infer.generate` and `infer.evaluate` load like a trained one.

Layout: config.json and tokenizer.json (as written by training), compression.json (the method, the sparsity of every
compressed weight per layer, bits per weight, time) and an orbax checkpoint {step, params, packed}. Quantized weights
are stored packed: their integer codes bit-packed at `bits` per weight (uint8 stream), beside float32 scales and
uint8 zero points per (layer, group, output). Pruned weights are stored dense with their zeros (the mask is w == 0).
`load_packed` serves quantized weights as stored (`model.quant=packed`: the codes re-laid out for the kernels, never a
float copy); `load_params` unpacks and dequantizes into the float model instead (methods that do not quantize, QMoE,
or shapes the packed kernels do not take). QMoE workdirs (`save_qmoe`) store
expert weights as dictionary-coded ternary streams instead (see `infer/compress/qmoe.py`).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from infer.compress import qmoe, ternary_code
from infer.compress.result import Compressed
from model import quant
from model import transformer
from model.kernels import cpu_native
from workdir import checkpoint as checkpoint_lib
from workdir import layout


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
  """Integer codes in [0, 2^bits), bits <= 16 (any shape) -> uint8 [ceil(size * bits / 8)], `bits` bits per code,
  big-endian."""
  c = np.asarray(codes).reshape(-1)
  if c.size and (int(c.max()) >= 2 ** bits or int(c.min()) < 0):
    raise ValueError(f"a code {int(c.max())} does not fit in {bits} bits")
  as_bytes = c.astype(">u2").view(np.uint8).reshape(-1, 2)
  return np.packbits(np.unpackbits(as_bytes, axis=1)[:, 16 - bits:].reshape(-1))


def unpack_codes(packed: np.ndarray, bits: int, shape) -> np.ndarray:
  """Inverse of `pack_codes`: codes of `shape`, uint8 for bits <= 8, else uint16."""
  n = int(np.prod(shape))
  b = np.unpackbits(np.asarray(packed, np.uint8))[:n * bits].reshape(n, bits)
  wide = np.packbits(np.concatenate([np.zeros((n, 16 - bits), np.uint8), b], axis=1), axis=1)
  out = wide.view(">u2").reshape(shape).astype(np.uint16)
  return out.astype(np.uint8) if bits <= 8 else out


def _packed_abstract(meta: dict) -> dict:
  out = {}
  for path, p in meta["packed"].items():
    layers, k, n = p["layers"], p["in"], p["out"]
    groups = k // (p["group_size"] or k)
    out[path] = {"codes": jax.ShapeDtypeStruct((-(-layers * k * n * p["bits"] // 8),), jnp.uint8),
                 "scale": jax.ShapeDtypeStruct((layers, groups, n), jnp.float32),
                 "zero": jax.ShapeDtypeStruct((layers, groups, n), jnp.uint8)}
  return out


def save(out: str, *, config, source_workdir: str, step: int, params: dict,
         layers: dict[str, list[Compressed]], metadata: dict) -> dict:
  """Writes the compressed workdir `out` (must not exist or be empty). `params` is the float dict with compressed
  weights (see `pipeline.compress_model`); quantized ones are stored packed. Returns the metadata written."""
  layout.new_derived(out, source_workdir, config)
  params = jax.tree.map(lambda x: x, params)
  blocks = params["blocks"]
  packed, packed_meta = {}, {}
  for path, results in layers.items():
    if not results[0].bits:
      continue
    parent, name = path.split("/")
    full_shape = tuple(blocks[parent][name].shape)
    bits, group_size = results[0].bits, results[0].group_size
    codes = np.stack([np.asarray(r.codes) for r in results])  # [layers, in, out]
    packed[path] = {"codes": pack_codes(codes, bits), "scale": np.stack([np.asarray(r.scale) for r in results]),
                    "zero": np.stack([np.asarray(r.zero) for r in results]).astype(np.uint8)}
    packed_meta[path] = {"shape": full_shape, "layers": codes.shape[0], "in": codes.shape[1], "out": codes.shape[2],
                         "bits": bits, "group_size": group_size}
    del blocks[parent][name]
  meta = dict(metadata, source_workdir=os.path.abspath(source_workdir), step=step, packed=packed_meta)
  checkpoint_lib.save_tree(out, step, {"step": jnp.asarray(step, jnp.int32), "params": params, "packed": packed})
  layout.write_json(layout.path(out, layout.COMPRESSION), meta, indent=2)  # last: it marks a complete save
  return meta


def _restore(workdir: str, meta: dict, abstract_params: dict, step: int | None, suffixes=("",)) -> tuple[dict, int]:
  """The checkpoint of a packed compressed workdir: {"params": the parameters other than the packed weights (and,
  per `suffixes`, their companions such as "_scale"), "packed": codes, scale, zero per packed weight}."""
  abstract = jax.tree.map(lambda x: x, abstract_params)
  for path in meta["packed"]:
    parent, name = path.split("/")
    for suffix in suffixes:
      del abstract["blocks"][parent][name + suffix]
  target = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract, "packed": _packed_abstract(meta)}
  return checkpoint_lib.restore_state(workdir, target, step)


def packed_fields(meta: dict, spec, abstract_params: dict) -> dict | None:
  """The ModelSpec fields that serve this compressed workdir's weights as stored ({"quant": "packed", "quant_bits",
  "quant_group_size"}) of the float model `spec` with parameters `abstract_params`, or None when that is not
  possible: no quantized weights, QMoE, an MoE model, a block weight
  left float, bits or group sizes that differ between weights, or an output size not a multiple of 64."""
  packed = meta.get("packed") or {}
  if not packed or "qmoe" in meta or spec.num_experts:
    return None
  blocks = abstract_params["blocks"]
  present = {f"{parent[0]}/{name}" for parent, name, _ in quant.BLOCK_WEIGHTS if name in blocks[parent[0]]}
  bits = {p["bits"] for p in packed.values()}
  groups = {p["group_size"] or 0 for p in packed.values()}
  if (set(packed) != present or len(bits) != 1 or len(groups) != 1 or next(iter(bits)) not in cpu_native.PACKED_BITS
      or any(not cpu_native.supports_kn(p["out"]) for p in packed.values())):
    return None
  group = next(iter(groups))
  return {"quant": "packed", "quant_bits": next(iter(bits)), "quant_group_size": 0 if group in (0, None) else group}


def load_packed(workdir: str, abstract_params: dict, step: int | None = None) -> tuple[dict, int]:
  """(params, step) of a compressed workdir for the packed spec of `packed_fields`; `abstract_params` is that spec's
  parameter tree. Each quantized weight becomes its codes in `cpu_native.to_kernel_layout` [layers, k * n * bits / 8]
  (uint8, the stored size) and float32 [layers, 2, groups, *out] (scale, zero point)."""
  meta = layout.read_json(layout.path(workdir, layout.COMPRESSION))
  state, step = _restore(workdir, meta, abstract_params, step, suffixes=("", "_scale"))
  params = state["params"]
  for path, p in meta["packed"].items():
    parent, name = path.split("/")
    stored = state["packed"][path]
    codes = unpack_codes(np.asarray(stored["codes"]), p["bits"], (p["layers"], p["in"], p["out"]))
    out_shape = tuple(abstract_params["blocks"][parent][name + "_scale"].shape[3:])
    params["blocks"][parent][name], params["blocks"][parent][name + "_scale"] = packed_weight(
        codes, stored["scale"], stored["zero"], p["bits"], out_shape)
  return params, step


def packed_weight(codes, scale, zero, bits: int, out_shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """One weight of a `quant=packed` model from its codes [layers, k, n] in [0, 2^bits), scale and zero point
  [layers, groups, n]: (uint8 [layers, k * n * bits / 8] in `cpu_native.to_kernel_layout`,
  float32 [layers, 2, groups, *out_shape] holding scale and zero)."""
  grid = np.stack([np.asarray(scale, np.float32), np.asarray(zero, np.float32)], axis=1)
  return (jnp.asarray(cpu_native.to_kernel_layout(np.asarray(codes), bits)),
          jnp.asarray(grid.reshape(grid.shape[:3] + tuple(out_shape))))


def load_params(workdir: str, abstract_params: dict, step: int | None = None) -> tuple[dict, int, dict]:
  """(float params with dequantized weights, step, metadata) of a compressed workdir; `abstract_params` is the
  float model's parameter tree (ShapeDtypeStructs)."""
  meta = layout.read_json(layout.path(workdir, layout.COMPRESSION))
  if "qmoe" in meta:
    return _load_qmoe(workdir, meta, abstract_params, step)
  state, step = _restore(workdir, meta, abstract_params, step)
  params = state["params"]
  for path, p in meta["packed"].items():
    parent, name = path.split("/")
    stored = state["packed"][path]
    codes = unpack_codes(np.asarray(stored["codes"]), p["bits"], (p["layers"], p["in"], p["out"]))
    size = p["group_size"] or p["in"]
    scale = np.repeat(np.asarray(stored["scale"]), size, axis=1)
    zero = np.repeat(np.asarray(stored["zero"]), size, axis=1).astype(np.float32)
    weight = jnp.asarray(scale * (codes.astype(np.float32) - zero))  # same arithmetic as quantizer.dequantize
    dtype = abstract_params["blocks"][parent][name].dtype
    params["blocks"][parent][name] = weight.reshape(p["shape"]).astype(dtype)
  return params, step, meta


# -- QMoE: dictionary-coded ternary experts ---------------------------------------------------------------------------


def _qmoe_key(unit: int, layer: int, name: str) -> str:
  return f"u{unit}_l{layer}_{name}"


def save_qmoe(out: str, *, config, source_workdir: str, step: int, params: dict, results: dict, encoding: dict,
              metadata: dict) -> dict:
  """Writes a QMoE workdir: every expert weight coded (codewords bit-packed at the dictionary's width, codewords per
  row, float16 lo/hi per row), one shared dictionary (2-bit symbols, uint8 lengths), and the other parameters as
  they are (see `qmoe.stored_bits`). `results`/`encoding` come from `qmoe.compress_model`/`qmoe.encode_model`."""
  layout.new_derived(out, source_workdir, config)
  params = jax.tree.map(lambda x: x, params)
  d = encoding["dictionary"]
  coded, coded_meta = {}, {}
  for (u, j, name), r in results.items():
    params["blocks"]["layers"][j]["moe"].pop(name, None)
    enc = encoding["encoded"][(u, j, name)]
    key = _qmoe_key(u, j, name)
    counts = np.diff(enc.offsets)
    count_bits = qmoe.count_bits(int(counts.max(initial=0)))
    coded[key] = {"codes": pack_codes(enc.codes, d.code_bits),
                  "counts": counts.astype(np.uint8 if count_bits == 8 else np.uint16),
                  "lo": np.asarray(r.grid[0]).astype(qmoe.GRID_DTYPE), "hi": np.asarray(r.grid[1]).astype(qmoe.GRID_DTYPE)}
    coded_meta[key] = {"unit": u, "layer": j, "name": name, "codes": int(enc.codes.size), "rows": enc.rows,
                       "cols": enc.cols, "experts": int(r.weight.shape[0]), "out": int(r.weight.shape[2]),
                       "count_bits": count_bits}
  meta = dict(metadata, source_workdir=os.path.abspath(source_workdir), step=step, packed={},
              qmoe={"format": 2, "weights": coded_meta, "entries": list(d.entries.shape), "code_bits": d.code_bits})
  checkpoint_lib.save_tree(out, step, {"step": jnp.asarray(step, jnp.int32), "params": params, "qmoe": coded,
                                       "dictionary": {"entries": pack_codes(d.entries, 2),
                                                      "lengths": d.lengths.astype(np.uint8)}})
  layout.write_json(layout.path(out, layout.COMPRESSION), meta, indent=2)  # last: it marks a complete save
  return meta


def _coded_abstract(q: dict) -> dict:
  """The stored arrays of a QMoE checkpoint, as ShapeDtypeStructs (format 1: the first release, int32 offsets,
  uint16 codes, float32 grids, unpacked dictionary)."""
  sds = jax.ShapeDtypeStruct
  legacy = q.get("format", 1) == 1
  out = {}
  for k, w in q["weights"].items():
    grid = sds((w["experts"], w["out"]), jnp.float32 if legacy else qmoe.GRID_DTYPE)
    if legacy:
      out[k] = {"codes": sds((w["codes"],), jnp.uint16), "offsets": sds((w["rows"] + 1,), jnp.int32), "lo": grid,
                "hi": grid}
    else:
      out[k] = {"codes": sds((-(-w["codes"] * q["code_bits"] // 8),), jnp.uint8),
                "counts": sds((w["rows"],), jnp.uint8 if w["count_bits"] == 8 else jnp.uint16), "lo": grid, "hi": grid}
  entries, max_len = q["entries"]
  dictionary = ({"entries": sds((entries, max_len), jnp.uint8), "lengths": sds((entries,), jnp.int32)} if legacy else
                {"entries": sds((-(-entries * max_len * 2 // 8),), jnp.uint8), "lengths": sds((entries,), jnp.uint8)})
  return {"qmoe": out, "dictionary": dictionary}


def read_qmoe(workdir: str, step: int | None = None, abstract_params: dict | None = None):
  """The coded experts of a QMoE workdir as the kernels take them: ({key: {"codes" uint16 [n], "offsets" int32
  [rows + 1], "lo"/"hi" float32 [experts, out]}}, Dictionary, stored {key: {array: bytes}} and dictionary bytes,
  the rest of the state, step). `abstract_params`: the float model's parameter tree (None: from the workdir's
  config)."""
  meta = layout.read_json(layout.path(workdir, layout.COMPRESSION))
  q = meta["qmoe"]
  if abstract_params is None:
    spec = transformer.ModelSpec.from_config(layout.load_config(workdir).model)
    abstract_params = jax.eval_shape(lambda: transformer.init_params(spec, 0))
  abstract = jax.tree.map(lambda x: x, abstract_params)
  for w in q["weights"].values():
    abstract["blocks"]["layers"][w["layer"]]["moe"].pop(w["name"], None)
  target = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract, **_coded_abstract(q)}
  state, step = checkpoint_lib.restore_state(workdir, target, step)
  legacy = q.get("format", 1) == 1
  entries, max_len = q["entries"]
  stored = state["dictionary"]
  d = ternary_code.Dictionary(
      np.asarray(stored["entries"]) if legacy else unpack_codes(stored["entries"], 2, (entries, max_len)),
      np.asarray(stored["lengths"]).astype(np.int32), None, None, q["code_bits"])
  coded, sizes = {}, {}
  for key, w in q["weights"].items():
    c = state["qmoe"][key]
    sizes[key] = {name: int(np.asarray(a).nbytes) for name, a in c.items()}
    offsets = (np.asarray(c["offsets"]) if legacy else
               np.concatenate([[0], np.cumsum(np.asarray(c["counts"], np.int64))]).astype(np.int32))
    codes = (np.asarray(c["codes"]) if legacy else
             unpack_codes(np.asarray(c["codes"]), q["code_bits"], (w["codes"],)).astype(np.uint16))
    coded[key] = {"codes": codes, "offsets": offsets, "lo": np.asarray(c["lo"], np.float32),
                  "hi": np.asarray(c["hi"], np.float32)}
  dictionary_bytes = sum(int(np.asarray(a).nbytes) for a in stored.values())
  return coded, d, sizes, dictionary_bytes, state, step


def _load_qmoe(workdir: str, meta: dict, abstract_params: dict, step: int | None):
  q = meta["qmoe"]
  coded, d, _, _, state, step = read_qmoe(workdir, step, abstract_params)
  params = state["params"]
  meta = dict(meta, coded_arrays=coded, dictionary_arrays=(d.entries, d.lengths))
  stacks: dict[tuple[int, str], dict[int, np.ndarray]] = {}
  for key, w in q["weights"].items():
    c = coded[key]
    enc = ternary_code.Encoded(c["codes"], c["offsets"], w["rows"], w["cols"])
    stacks.setdefault((w["layer"], w["name"]), {})[w["unit"]] = qmoe.decode_weight(enc, d, c["lo"], c["hi"],
                                                                                   w["experts"])
  for (layer, name), units in stacks.items():
    dtype = abstract_params["blocks"]["layers"][layer]["moe"][name].dtype
    params["blocks"]["layers"][layer]["moe"][name] = jnp.asarray(np.stack([units[u] for u in sorted(units)])).astype(dtype)
  return params, step, meta
