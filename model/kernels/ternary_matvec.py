"""Fused decode + matrix-vector product for dictionary-coded ternary weights (QMoE's compressed format).

A weight W [K, N] (our [in, out] layout) is stored as N rows of K ternary symbols (0: zero, 1: lo[n], 2: hi[n]),
each row coded separately as fixed-width codewords into a Tunstall dictionary (`infer/compress/ternary_code.py`):
codes [C] (all rows, row after row), offsets [N + 1] (row n is codes[offsets[n]:offsets[n + 1]]), entries
[D, max_len] (the symbol run of each codeword) and lengths [D].

`ternary_matvec(x, ...)` computes x [M, K] @ W -> [M, N] float32 without materialising W: each program decodes one
output row into a K-symbol buffer by table lookups, maps the symbols to {0, lo, hi} and reduces against x. The work
per row is its codeword count, which is what the compression saves. Interpret mode on CPU; Triton on GPU is not
yet verified (the per-row loop has a data-dependent trip count). `ternary_matvec_reference` decodes then multiplies.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl


def _kernel(row_ref, offsets_ref, codes_ref, entries_ref, lengths_ref, lo_ref, hi_ref, x_ref, o_ref, *, cols, max_len):
  n = row_ref[0] + pl.program_id(0)
  start, end = offsets_ref[n], offsets_ref[n + 1]

  def body(c, carry):
    buf, pos = carry
    code = codes_ref[c]
    run = entries_ref[pl.ds(code, 1), :][0]
    buf = jax.lax.dynamic_update_slice(buf, run, (pos,))
    return buf, pos + lengths_ref[code]

  buf, _ = jax.lax.fori_loop(start, end, body, (jnp.zeros((cols + max_len,), jnp.int32), jnp.int32(0)))
  sym = buf[:cols]
  w = jnp.where(sym == 1, lo_ref[n], jnp.where(sym == 2, hi_ref[n], 0.0)).astype(jnp.float32)
  o_ref[...] = jnp.sum(x_ref[...].astype(jnp.float32) * w[None, :], axis=1, keepdims=True)


def ternary_matvec(x: jax.Array, codes: jax.Array, offsets: jax.Array, entries: jax.Array, lengths: jax.Array,
                   lo: jax.Array, hi: jax.Array, *, row_start: jax.Array | int = 0, rows: int | None = None,
                   interpret: bool | None = None) -> jax.Array:
  """x [M, K] float @ the coded ternary W [K, N] -> [M, N] float32 (see the module docstring for the operands).

  The stream may hold several matrices one after another (e.g. every expert's, rows = experts x N): `row_start`
  (a traced int is fine) and `rows` = N select rows [row_start, row_start + N) of it."""
  m, k = x.shape
  total = lo.shape[0]
  n = total if rows is None else rows
  if offsets.shape != (total + 1,) or hi.shape != (total,):
    raise ValueError(f"offsets must be [{total + 1}] and lo/hi [{total}]; got {offsets.shape}, {lo.shape}, {hi.shape}")
  max_len = entries.shape[1]
  interpret = jax.default_backend() == "cpu" if interpret is None else interpret
  full = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))  # noqa: E731
  kernel = functools.partial(_kernel, cols=k, max_len=max_len)
  return pl.pallas_call(
      kernel, grid=(n,),
      in_specs=[full((1,)), full((total + 1,)), full(codes.shape), full(entries.shape), full(lengths.shape),
                full((total,)), full((total,)), full((m, k))],
      out_specs=pl.BlockSpec((m, 1), lambda i: (0, i)),
      out_shape=jax.ShapeDtypeStruct((m, n), jnp.float32), interpret=interpret, name="ternary_matvec")(
          jnp.reshape(jnp.asarray(row_start, jnp.int32), (1,)), offsets.astype(jnp.int32), codes.astype(jnp.int32),
          entries.astype(jnp.int32), lengths.astype(jnp.int32), lo.astype(jnp.float32), hi.astype(jnp.float32), x)


def ternary_matvec_reference(x, symbols: np.ndarray, lo, hi) -> jax.Array:
  """Decode-then-matmul: symbols [N, K] (already decoded) -> x [M, K] @ W [K, N] float32."""
  sym = jnp.asarray(symbols)
  w = jnp.where(sym == 1, lo[:, None], jnp.where(sym == 2, hi[:, None], 0.0)).astype(jnp.float32)  # [N, K]
  return jnp.dot(x.astype(jnp.float32), w.T, precision=jax.lax.Precision.HIGHEST)
