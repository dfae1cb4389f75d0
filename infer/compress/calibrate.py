"""Calibration for one-shot compression: sample token windows, then compress the model block by block.

`sequential` follows SparseGPT/GPTQ: the calibration activations enter block 0; for each block the input Hessians
H = 2/n X^T X of its linear layers are accumulated in float32 batch by batch (never holding the activations of more
than one batch at a time beside the block inputs), its weights are compressed, and the block is re-run with the
compressed weights so the next block calibrates on what the compressed model really feeds it. With
`true_sequential`, the four input groups inside a block are also compressed in order (q/k/v, then the output
projection on inputs from the compressed q/k/v, then the MLP input, then the MLP output).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.attention import Visibility
from model.transformer import TAPS
from train import data as data_lib
from workdir import tokenizer as tokenizer_lib

LINEAR_INPUTS = TAPS  # Hessian name -> the block weights (parent, name) that read that input, in true_sequential order
N_IN = {"wo": 2}  # leading input axes of each weight (default 1)


def calibration_samples(config, tokenizer, *, num_samples: int, seq_len: int, seed: int) -> np.ndarray:
  """`num_samples` windows of `seq_len` tokens [n, seq_len] int32 at random offsets (numpy `seed`) of the training
  split's token stream (documents in a seeded random order, each as EOT + tokens). Raises ValueError if the training
  split is shorter than one window."""
  if num_samples <= 0 or seq_len <= 1:
    raise ValueError(f"calibration needs num_samples > 0 and seq_len > 1, got {num_samples} and {seq_len}")
  source = data_lib.load_sources(config)["train"]
  rng = np.random.default_rng(seed)
  stream, total = [], 0
  want = 4 * num_samples * seq_len  # enough text that windows rarely overlap
  for index in rng.permutation(len(source)):
    ids = tokenizer_lib.encode_document(tokenizer, source[int(index)]["text"])
    stream.append(np.asarray(ids, np.int32))
    total += len(ids)
    if total >= want:
      break
  tokens = np.concatenate(stream)
  if len(tokens) < seq_len:
    raise ValueError(f"the training split has {len(tokens)} tokens, fewer than one calibration window of {seq_len}")
  starts = rng.integers(0, len(tokens) - seq_len + 1, size=num_samples)
  return np.stack([tokens[s:s + seq_len] for s in starts])


def _gram(x: jax.Array) -> jax.Array:
  """x [..., k] -> X^T X [k, k] float32 over all leading positions."""
  x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  return jnp.einsum("ti,tj->ij", x, x, precision=jax.lax.Precision.HIGHEST)


def make_block_pass(blocks_graphdef: nnx.GraphDef):
  """A jitted fn(layer_params, x [B, L, D], which) -> (block output [B, L, D], {name: X^T X} for names in which)."""

  def run(layer_params, x, which):
    block = nnx.merge(blocks_graphdef, layer_params)
    b, l = x.shape[:2]
    positions = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    visibility = Visibility.causal_self(jnp.ones((b, l), jnp.int32))
    y, _, _, taps = block.forward(x, positions, visibility)
    return y, {name: _gram(taps[name]) for name in which}

  return jax.jit(run, static_argnames="which")


# compress_fn(layer index, "attn/wq", w [in, out] float32, H [in, in] float32 or None) -> compressed w [in, out]
CompressFn = Callable[[int, str, jax.Array, jax.Array | None], jax.Array]


def sequential(model, samples: np.ndarray | None, compress_fn: CompressFn, *, batch_size: int = 8,
               true_sequential: bool = True, needs_hessian: bool = True) -> dict:
  """Compresses every linear weight of every block of `model` (embeddings, norms, biases and the head untouched).

  samples [n, L] int32 calibration windows (unused when not `needs_hessian`). Returns the model's pure parameter
  dict with the compressed block weights."""
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  blocks = params["blocks"]
  num_layers = model.spec.num_layers
  present = {name: [(p, w) for p, w in ws if blocks[p].get(w) is not None] for name, ws in LINEAR_INPUTS.items()}
  layers = [jax.tree.map(lambda a, i=i: a[i], blocks) for i in range(num_layers)]

  def compress_group(i, name, hessian):
    for parent, weight in present[name]:
      w = layers[i][parent][weight]
      n_in = N_IN.get(weight, 1)
      k = int(np.prod(w.shape[:n_in]))
      new = compress_fn(i, f"{parent}/{weight}", w.reshape(k, -1).astype(jnp.float32), hessian)
      layers[i][parent][weight] = jnp.asarray(new).reshape(w.shape).astype(w.dtype)

  if not needs_hessian:
    for i in range(num_layers):
      for name in LINEAR_INPUTS:
        compress_group(i, name, None)
  else:
    if samples is None or not len(samples):
      raise ValueError("Hessian-based compression needs calibration samples")
    blocks_graphdef = nnx.split(model.blocks)[0]
    block_pass = make_block_pass(blocks_graphdef)
    embed = jax.jit(lambda ids: model.embed_tokens(ids, jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)))
    xs = [embed(jnp.asarray(samples[s:s + batch_size])) for s in range(0, len(samples), batch_size)]
    tokens = sum(x.shape[0] * x.shape[1] for x in xs)
    stages = tuple((name,) for name in LINEAR_INPUTS) if true_sequential else (tuple(LINEAR_INPUTS),)
    for i in range(num_layers):
      for which in stages:
        which = tuple(n for n in which if present[n])
        grams = None
        for x in xs:
          _, g = block_pass(layers[i], x, which)
          grams = g if grams is None else jax.tree.map(jnp.add, grams, g)
        for name in which:
          compress_group(i, name, grams[name] * (2.0 / tokens))
      xs = [block_pass(layers[i], x, ())[0] for x in xs]  # the compressed block feeds the next one
  params["blocks"] = jax.tree.map(lambda *a: jnp.stack(a), *layers)
  return params
