"""Fused decode + matrix-vector product for dictionary-coded ternary weights (QMoE's compressed format).

A weight W [K, N] (our [in, out] layout) is stored as N rows of K ternary symbols (0: zero, 1: lo[n], 2: hi[n]),
each row coded separately as fixed-width codewords into a Tunstall dictionary (`infer/compress/ternary_code.py`):
codes [C] (all rows, row after row), offsets [N + 1] (row n is codes[offsets[n]:offsets[n + 1]]), entries
[D, max_len] (the symbol run of each codeword) and lengths [D].

`ternary_matvec(x, ...)` computes x [M, K] @ W -> [M, N] float32 without materialising W: each program decodes one
output row, one codeword at a time: it looks the codeword's symbol run up in the dictionary, maps it to {0, lo, hi}
and reduces it against the slice of x that the run covers. The work per row is its codeword count, which is what
the compression saves. Interpret mode on CPU, Triton on GPU (tiles padded to powers of two).

On TPU (chosen by the platform the program is lowered for) a Mosaic variant runs instead, laid out for what Mosaic
can address: a lane offset must be a static multiple of 128, a sublane offset may be any traced value. So x is
transposed to [K + run, M] and each codeword's slice is a dynamic sublane window, reduced against its run's
{lo-mask, hi-mask} [2, run] on the MXU; lo and hi scale the two sums once per row. The code stream stays in HBM and is
copied into SMEM in chunks of up to 8,192 codewords as the walk reaches them (SMEM holds 1 MiB on v5e); offsets, lo,
hi (this matrix's rows) and the codeword lengths live in SMEM, the dictionary's runs in VMEM. Each program owns 128
output rows; the output is built transposed ([N, M], a row per store) and turned back outside.
`ternary_matvec_reference` decodes then multiplies.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

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
  if interpret is None:  # by the platform the program is lowered for: Mosaic on TPU, ours elsewhere
    return jax.lax.platform_dependent(
        x, codes, offsets, entries, lengths, lo, hi, jnp.asarray(row_start, jnp.int32),
        tpu=functools.partial(_tpu_ternary_matvec, rows=n),
        default=lambda *a: _pallas_ternary_matvec(*a, rows=n, interpret=jax.default_backend() == "cpu"))
  return _pallas_ternary_matvec(x, codes, offsets, entries, lengths, lo, hi, row_start, rows=n, interpret=interpret)


def _pallas_ternary_matvec(x, codes, offsets, entries, lengths, lo, hi, row_start, *, rows, interpret):
  """Our Pallas kernel for CPU (interpret) and GPU (Triton); the arguments of `ternary_matvec`, checked there."""
  m, k = x.shape
  total, n = lo.shape[0], rows
  run_len = max(16, pl.next_power_of_2(entries.shape[1]))  # Triton tiles are powers of two
  mp = pl.next_power_of_2(m)
  entries_p = pad_axis(entries.astype(jnp.int32), 1, run_len)
  x_p = pad_axis(pad_axis(x, 0, mp), 1, k + run_len)  # a run may read past K: zeros there
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


TPU_ROWS = 128  # output rows per TPU program
TPU_CHUNK = 8192  # codewords per SMEM refill (a multiple of STREAM_ALIGN)
STREAM_ALIGN = 128  # TPU DMA windows start on a multiple of 128 codewords


def align_stream(codes: jax.Array) -> jax.Array:
  """codes [C] zero-padded to a multiple of STREAM_ALIGN (offsets unchanged): done once when a model is loaded, so
  that the TPU kernel never copies the stream; the padding is never decoded."""
  return pad_axis(codes, 0, pl.cdiv(codes.shape[0], STREAM_ALIGN) * STREAM_ALIGN)


def _tpu_kernel(offsets_ref, lo_ref, hi_ref, lengths_ref, codes_hbm, entries_ref, x_ref, o_ref, buf_ref, sem, *,
                run_len, chunk, num_codes):
  """offsets/lo/hi: this matrix's rows (SMEM); codes [1, C] in HBM, `chunk` at a time in buf_ref (SMEM); entries
  [D, run] and x transposed [K + run, M] in VMEM; o_ref [TPU_ROWS, M] (rows of the transposed output)."""
  first_row = pl.program_id(0) * TPU_ROWS
  step = jax.lax.broadcasted_iota(jnp.int32, (1, run_len), 1)

  def refill(base):
    copy = pltpu.make_async_copy(codes_hbm.at[0, pl.ds(base, chunk)], buf_ref, sem)
    copy.start()
    copy.wait()

  def row(r, base):
    n = first_row + r

    def codeword(c, carry):
      acc, pos, base = carry
      stale = c >= base + chunk  # the walk left the chunk in SMEM: fetch the next one, from c's aligned window
      base = jnp.where(stale, jnp.minimum(jax.lax.div(c, STREAM_ALIGN) * STREAM_ALIGN, num_codes - chunk), base)
      base = pl.multiple_of(base, STREAM_ALIGN)
      pl.when(stale)(lambda: refill(base))
      code = buf_ref[c - base]
      length = lengths_ref[code]
      run = entries_ref[pl.ds(code, 1), :]  # [1, run]
      live = step < length
      masks = jnp.concatenate([((run == 1) & live).astype(jnp.float32), ((run == 2) & live).astype(jnp.float32)])
      xs = x_ref[pl.ds(pos, run_len), :]  # [run, M]: the inputs this run covers
      return acc + jax.lax.dot_general(masks, xs, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32,
                                       precision=jax.lax.Precision.HIGHEST), pos + length, base

    init = (jnp.zeros((2, x_ref.shape[1]), jnp.float32), jnp.int32(0), base)
    sums, _, base = jax.lax.fori_loop(offsets_ref[n], offsets_ref[n + 1], codeword, init)
    o_ref[pl.ds(r, 1), :] = lo_ref[n] * sums[0:1] + hi_ref[n] * sums[1:2]
    return base

  jax.lax.fori_loop(0, TPU_ROWS, row, jnp.int32(-2 * chunk))  # nothing fetched yet


def _tpu_ternary_matvec(x, codes, offsets, entries, lengths, lo, hi, row_start, *, rows):
  """TPU path of `ternary_matvec` (arguments checked there)."""
  m, k = x.shape
  codes = align_stream(codes)  # a no-op for streams aligned at load time
  n, num_codes = rows, codes.shape[0]
  chunk = min(TPU_CHUNK, num_codes)
  run_len = entries.shape[1]
  mp = pl.cdiv(m, 8) * 8
  nb = pl.cdiv(n, TPU_ROWS)
  # this matrix's rows; padded rows get empty code ranges (start = end) and write zeros
  offs = jax.lax.dynamic_slice_in_dim(offsets.astype(jnp.int32), row_start, n + 1)
  offs = jnp.pad(offs, (0, nb * TPU_ROWS - n), mode="edge")
  lo_, hi_ = (pad_axis(jax.lax.dynamic_slice_in_dim(a.astype(jnp.float32), row_start, n), 0, nb * TPU_ROWS)
              for a in (lo, hi))
  # [K + run, M] float32 (a run may read past K: zeros there); 32-bit, as a window may start on any sublane
  x_t = pad_axis(pad_axis(x.astype(jnp.float32), 0, mp), 1, k + run_len).T
  whole = lambda a: pl.BlockSpec(a.shape, lambda i, *_: (0,) * a.ndim)  # noqa: E731
  entries_ = entries.astype(jnp.int32)
  vmem_bytes = 4 * (entries_.shape[0] * max(128, run_len) + x_t.shape[0] * max(128, mp) + 2 * TPU_ROWS * max(128, mp))
  out = pl.pallas_call(
      functools.partial(_tpu_kernel, run_len=run_len, chunk=chunk, num_codes=num_codes),
      grid_spec=pltpu.PrefetchScalarGridSpec(  # the per-row tables and codeword lengths, prefetched into SMEM
          num_scalar_prefetch=4, grid=(nb,),
          in_specs=[pl.BlockSpec(memory_space=pl.ANY), whole(entries_), whole(x_t)],
          out_specs=pl.BlockSpec((TPU_ROWS, mp), lambda i, *_: (i, 0)),
          scratch_shapes=[pltpu.SMEM((chunk,), jnp.int32), pltpu.SemaphoreType.DMA(())]),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",),
                                           vmem_limit_bytes=max(32 * 2**20, 2 * vmem_bytes + 2**20)),
      out_shape=jax.ShapeDtypeStruct((nb * TPU_ROWS, mp), jnp.float32), name="ternary_matvec_tpu")(
          offs, lo_, hi_, lengths.astype(jnp.int32), codes.astype(jnp.int32).reshape(1, -1), entries_, x_t)
  return out[:n, :m].T


def ternary_matvec_reference(x, symbols: np.ndarray, lo, hi) -> jax.Array:
  """Decode-then-matmul: symbols [N, K] (already decoded) -> x [M, K] @ W [K, N] float32."""
  sym = jnp.asarray(symbols)
  w = jnp.where(sym == 1, lo[:, None], jnp.where(sym == 2, hi[:, None], 0.0)).astype(jnp.float32)  # [N, K]
  return jnp.dot(x.astype(jnp.float32), w.T, precision=jax.lax.Precision.HIGHEST)
