"""Fused decode + matrix-vector product for dictionary-coded ternary weights (QMoE's compressed format).

A weight W [K, N] (our [in, out] layout) is stored as N rows of K ternary symbols (0: zero, 1: lo[n], 2: hi[n]),
each row coded separately as fixed-width codewords into a Tunstall dictionary (`infer/compress/ternary_code.py`):
codes [C] (all rows, row after row), offsets [N + 1] (row n is codes[offsets[n]:offsets[n + 1]]), entries
[D, max_len] (the symbol run of each codeword) and lengths [D].

`ternary_matvec(x, ...)` computes x [M, K] @ W -> [M, N] float32 without materialising W: each program decodes one
output row, one codeword at a time: it looks the codeword's symbol run up in the dictionary, maps it to {0, lo, hi}
and reduces it against the slice of x that the run covers. The work per row is its codeword count, which is what
the compression saves. Interpret mode on CPU, Triton on GPU (tiles padded to powers of two).
`ternary_matvec_reference` decodes then multiplies.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from model.kernels.common import compiler_params, pad_axis


def _kernel(row_ref, offsets_ref, codes_ref, entries_ref, lengths_ref, lo_ref, hi_ref, x_ref, o_ref, *, run_len):
  n = row_ref[0] + pl.program_id(0)
  start, end = offsets_ref[n], offsets_ref[n + 1]
  lo, hi = lo_ref[n], hi_ref[n]
  step = jax.lax.broadcasted_iota(jnp.int32, (1, run_len), 1)

  def body(c, carry):
    acc, pos = carry
    code = codes_ref[c]
    run = entries_ref[pl.ds(code, 1), :]  # [1, run_len] symbols of this codeword
    length = lengths_ref[code]
    w = jnp.where((run == 1) & (step < length), lo, jnp.where((run == 2) & (step < length), hi, 0.0))
    xs = x_ref[:, pl.ds(pos, run_len)].astype(jnp.float32)  # [M, run_len] inputs this run covers
    return acc + jnp.sum(xs * w, axis=1, keepdims=True), pos + length

  acc, _ = jax.lax.fori_loop(start, end, body, (jnp.zeros(o_ref.shape, jnp.float32), jnp.int32(0)))
  o_ref[...] = acc


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
  run_len = max(16, pl.next_power_of_2(entries.shape[1]))  # Triton tiles are powers of two
  mp = pl.next_power_of_2(m)
  entries_p = pad_axis(entries.astype(jnp.int32), 1, run_len)
  x_p = pad_axis(pad_axis(x, 0, mp), 1, k + run_len)  # a run may read past K: zeros there
  interpret = jax.default_backend() == "cpu" if interpret is None else interpret
  full = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))  # noqa: E731
  out = pl.pallas_call(
      functools.partial(_kernel, run_len=run_len), grid=(n,),
      in_specs=[full((1,)), full((total + 1,)), full(codes.shape), full(entries_p.shape), full(lengths.shape),
                full((total,)), full((total,)), full(x_p.shape)],
      out_specs=pl.BlockSpec((mp, 1), lambda i: (0, i)),
      out_shape=jax.ShapeDtypeStruct((mp, n), jnp.float32), interpret=interpret,
      compiler_params=compiler_params(interpret), name="ternary_matvec")(
          jnp.reshape(jnp.asarray(row_start, jnp.int32), (1,)), offsets.astype(jnp.int32), codes.astype(jnp.int32),
          entries_p, lengths.astype(jnp.int32), lo.astype(jnp.float32), hi.astype(jnp.float32), x_p)
  return out[:m]


def ternary_matvec_reference(x, symbols: np.ndarray, lo, hi) -> jax.Array:
  """Decode-then-matmul: symbols [N, K] (already decoded) -> x [M, K] @ W [K, N] float32."""
  sym = jnp.asarray(symbols)
  w = jnp.where(sym == 1, lo[:, None], jnp.where(sym == 2, hi[:, None], 0.0)).astype(jnp.float32)  # [N, K]
  return jnp.dot(x.astype(jnp.float32), w.T, precision=jax.lax.Precision.HIGHEST)
