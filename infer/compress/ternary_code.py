"""Lossless coding of ternary weight streams with a static dictionary of frequent ternary runs (QMoE's idea).

Ternary GPTQ leaves most weights at 0 (the "natural sparsity"), so the symbol stream {0, -, +} has far less than
log2(3) bits of entropy. We build a Tunstall dictionary for the measured symbol probabilities: 2^code_bits entries,
each a ternary sequence of up to `max_len` symbols, chosen so that every stream parses greedily into entries and the
most probable runs (long runs of zeros) get one codeword each. Every codeword has the same width, so decoding is a
table lookup per codeword (what the fused kernel in `model/kernels/ternary_matvec.py` does), and each row of a
matrix is coded separately with an offset table, so rows decode independently and in parallel.

Symbols are the ternary codes of `quantizer.ternary_codes`: 0 (zero), 1 (lo), 2 (hi).
"""

from __future__ import annotations

import dataclasses
import heapq

import numpy as np


@dataclasses.dataclass
class Dictionary:
  """Tunstall dictionary: entries [D, max_len] uint8 symbols (padded with 0), lengths [D] int32, and the parse trie
  (child [nodes, 3] int32 node ids, leaf_code [nodes] int32: the entry of a leaf node or -1)."""

  entries: np.ndarray
  lengths: np.ndarray
  child: np.ndarray
  leaf_code: np.ndarray
  code_bits: int

  @property
  def nbytes(self) -> int:
    """Bytes as stored: 2 bits per entry symbol, one byte per length."""
    return int(-(-self.entries.size * 2 // 8) + self.lengths.size)


def entropy_bits(symbols: np.ndarray) -> float:
  """Zeroth-order empirical entropy of the symbols in bits per symbol (the bound for a memoryless code)."""
  counts = np.bincount(np.asarray(symbols, np.int64).reshape(-1), minlength=3).astype(np.float64)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log2(p)).sum())


def build_dictionary(symbols: np.ndarray, code_bits: int = 16, max_len: int = 32) -> Dictionary:
  """A Tunstall dictionary with at most 2^code_bits entries for the symbol frequencies of `symbols`."""
  if not 2 <= code_bits <= 16:
    raise ValueError(f"code_bits={code_bits} must be in [2, 16]")
  counts = np.bincount(np.asarray(symbols, np.int64).reshape(-1), minlength=3).astype(np.float64) + 1.0
  p = counts / counts.sum()  # add-one smoothing keeps every symbol parseable
  # Tree nodes: (sequence). Leaves are expanded most-probable first while the entry count fits.
  children: list[list[int]] = [[-1, -1, -1]]
  seqs: list[tuple[int, ...]] = [()]
  heap: list[tuple[float, int]] = []

  def add_children(node: int) -> None:
    prob = np.prod([p[s] for s in seqs[node]]) if seqs[node] else 1.0
    for s in range(3):
      children.append([-1, -1, -1])
      seqs.append(seqs[node] + (s,))
      children[node][s] = len(seqs) - 1
      if len(seqs[-1]) < max_len:
        heapq.heappush(heap, (-prob * p[s], len(seqs) - 1))

  add_children(0)
  leaves = 3
  while heap and leaves + 2 <= 2 ** code_bits:
    _, node = heapq.heappop(heap)
    add_children(node)
    leaves += 2
  child = np.asarray(children, np.int32)
  is_leaf = child[:, 0] < 0
  leaf_code = np.full(len(seqs), -1, np.int32)
  leaf_code[is_leaf] = np.arange(is_leaf.sum(), dtype=np.int32)
  leaf_seqs = [seqs[i] for i in np.flatnonzero(is_leaf)]
  entries = np.zeros((len(leaf_seqs), max_len), np.uint8)
  lengths = np.zeros(len(leaf_seqs), np.int32)
  for i, s in enumerate(leaf_seqs):
    entries[i, :len(s)] = s
    lengths[i] = len(s)
  return Dictionary(entries, lengths, child, leaf_code, code_bits)


@dataclasses.dataclass
class Encoded:
  """Rows of ternary symbols [rows, cols] as codewords: codes [n] uint16 (row after row), offsets [rows + 1] int32
  (row r is codes[offsets[r]:offsets[r + 1]]), decoding to exactly `cols` symbols per row."""

  codes: np.ndarray
  offsets: np.ndarray
  rows: int
  cols: int

  def bits_per_symbol(self, code_bits: int, with_offsets: bool = True) -> float:
    bits = self.codes.size * code_bits + (self.offsets.size * 32 if with_offsets else 0)
    return bits / max(self.rows * self.cols, 1)


def encode(symbols: np.ndarray, d: Dictionary) -> Encoded:
  """Greedy parse of every row of `symbols` [rows, cols] (values 0/1/2) into dictionary entries; all rows advance
  together one column at a time. A row's last, incomplete run is closed with the first entry below it (zeros), and
  decoding cuts it back to `cols`."""
  sym = np.asarray(symbols, np.int64)
  rows, cols = sym.shape
  node = np.zeros(rows, np.int64)
  emitted_rows, emitted_cols, emitted_codes = [], [], []
  for j in range(cols):
    node = d.child[node, sym[:, j]]
    done = d.leaf_code[node] >= 0
    if done.any():
      idx = np.flatnonzero(done)
      emitted_rows.append(idx)
      emitted_cols.append(np.full(idx.size, j))
      emitted_codes.append(d.leaf_code[node[idx]])
      node[idx] = 0
  open_rows = np.flatnonzero(node != 0)
  while open_rows.size:  # finish incomplete runs with zeros
    node[open_rows] = d.child[node[open_rows], 0]
    done = open_rows[d.leaf_code[node[open_rows]] >= 0]
    emitted_rows.append(done)
    emitted_cols.append(np.full(done.size, cols))
    emitted_codes.append(d.leaf_code[node[done]])
    node[done] = 0
    open_rows = np.flatnonzero(node != 0)
  r = np.concatenate(emitted_rows) if emitted_rows else np.zeros(0, np.int64)
  c = np.concatenate(emitted_cols) if emitted_cols else np.zeros(0, np.int64)
  codes = np.concatenate(emitted_codes) if emitted_codes else np.zeros(0, np.int32)
  order = np.lexsort((c, r))
  counts = np.bincount(r, minlength=rows)
  offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
  return Encoded(codes[order].astype(np.uint16), offsets, rows, cols)


def decode(e: Encoded, d: Dictionary) -> np.ndarray:
  """Inverse of `encode`: [rows, cols] uint8 symbols."""
  codes = e.codes.astype(np.int64)
  lengths = d.lengths[codes]
  flat = d.entries[codes][np.arange(d.entries.shape[1])[None, :] < lengths[:, None]]  # concatenated runs
  starts = np.concatenate([[0], np.cumsum(lengths)])[e.offsets[:-1]]  # first symbol of each row in `flat`
  return flat[starts[:, None] + np.arange(e.cols)[None, :]].astype(np.uint8)
