"""Mixture-of-experts MLP: top-k routing (Switch top-1, Mixtral top-2), auxiliary losses, and three ways to run the
experts that all compute the same function:

  * `dropless_experts`: assignments sorted by expert and run as grouped matmuls (`jax.lax.ragged_dot`); no token is
    ever dropped (MegaBlocks-style). The default on one device.
  * `capacity_experts`: fixed [experts, capacity, d] buffers (GShard/Switch); assignments past an expert's capacity
    are dropped (their contribution is 0) and counted. Used when `capacity_factor > 0`.
  * expert parallelism: under a mesh whose `expert` axis is > 1, the capacity buffers are exchanged with
    `all_to_all` inside `jax.shard_map` so each device runs only its own experts (capacity = all local tokens when
    capacity_factor is 0, which keeps it dropless).
The three agree exactly whenever nothing is dropped. With capacity_factor > 0 the dropped assignments differ: the
expert-parallel path sizes capacity and gives slot priority per token shard. Padding tokens never take a slot.

Shapes: T tokens, d model width, E experts, k experts per token, f expert hidden width. Expert weights are
w_in/w_gate [E, d, f] and w_out [E, f, d]; the router is [d, E] and runs in float32.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from model.activations import ACTIVATIONS
from model.kernels import ternary_matvec as tm


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Routing:
  expert_ids: jax.Array  # [T, k] int32, the chosen experts in decreasing router probability
  weights: jax.Array  # [T, k] float32 combine weights
  probs: jax.Array  # [T, E] float32 router softmax
  logits: jax.Array  # [T, E] float32


def route(x: jax.Array, router: jax.Array, k: int, renormalize: bool) -> Routing:
  """x [T, d] -> the top-k experts of each token. Combine weights are the router probabilities of the chosen
  experts, renormalized to sum to 1 when `renormalize` (Mixtral) or used as they are (Switch)."""
  logits = jnp.einsum("td,de->te", x.astype(jnp.float32), router.astype(jnp.float32))
  probs = jax.nn.softmax(logits, axis=-1)
  weights, expert_ids = jax.lax.top_k(probs, k)
  if renormalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return Routing(expert_ids.astype(jnp.int32), weights, probs, logits)


def aux_losses(r: Routing, mask: jax.Array | None = None) -> dict[str, jax.Array]:
  """Switch load-balancing loss E * sum_e f_e P_e (f_e: share of the k*T assignments sent to e, P_e: mean router
  probability of e; 1 when routing is uniform) and router z-loss mean(logsumexp(logits)^2), over tokens where
  `mask` [T] is 1 (default all)."""
  t, e = r.probs.shape
  mask = jnp.ones((t,), jnp.float32) if mask is None else mask.astype(jnp.float32)
  count = jnp.maximum(mask.sum(), 1.0)
  chosen = jax.nn.one_hot(r.expert_ids, e, dtype=jnp.float32).sum(1)  # [T, E]
  f = (chosen * mask[:, None]).sum(0) / (count * r.expert_ids.shape[1])
  p = (r.probs * mask[:, None]).sum(0) / count
  z = jax.nn.logsumexp(r.logits, axis=-1)
  return {"load_balance": e * jnp.sum(f * p), "router_z": (z * z * mask).sum() / count}


def gated_ffn(h_in, h_gate, activation):
  return ACTIVATIONS["silu"](h_gate) * h_in if h_gate is not None else ACTIVATIONS[activation](h_in)


def dropless_experts(x, r: Routing, w_in, w_gate, w_out, activation: str) -> jax.Array:
  """x [T, d] -> [T, d]: every assignment runs, grouped by expert with ragged matmuls (float32 accumulation)."""
  t, k = r.expert_ids.shape
  e = w_in.shape[0]
  flat = r.expert_ids.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  tokens = order // k
  group_sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
  xs = x[tokens]
  dot = lambda a, w: jax.lax.ragged_dot(a, w.astype(a.dtype), group_sizes,  # noqa: E731
                                        preferred_element_type=jnp.float32).astype(a.dtype)
  h = gated_ffn(dot(xs, w_in), None if w_gate is None else dot(xs, w_gate), activation)
  out = dot(h, w_out)  # [T * k, d] in sorted order
  unsorted = jnp.zeros_like(out).at[order].set(out).reshape(t, k, -1)
  return jnp.einsum("tkd,tk->td", unsorted.astype(jnp.float32), r.weights).astype(x.dtype)


def dispatch_positions(expert_ids: jax.Array, num_experts: int, capacity: int,
                       valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """expert_ids [T, k] -> (slot [T, k] int32 of each assignment in its expert's buffer, kept [T, k] bool).

  Slots are given choice-major (every token's first choice before any second choice), so when capacity runs out
  the lower-priority choices are the ones dropped. Tokens with valid [T] false (padding) take no slot."""
  t, k = expert_ids.shape
  onehot = jax.nn.one_hot(expert_ids.T.reshape(-1), num_experts, dtype=jnp.int32)  # [k*T, E], choice-major
  live = jnp.ones((t,), bool) if valid is None else valid.astype(bool)
  onehot = onehot * jnp.tile(live, k).astype(jnp.int32)[:, None]
  slot = (jnp.cumsum(onehot, axis=0) - 1) * onehot
  slot = slot.sum(-1).reshape(k, t).T
  return slot, (slot < capacity) & live[:, None]


def dispatch(x, r: Routing, num_experts: int, capacity: int, valid=None):
  slot, kept = dispatch_positions(r.expert_ids, num_experts, capacity, valid)
  t, k = slot.shape
  token = jnp.broadcast_to(jnp.arange(t)[:, None], (t, k))
  slot_or_out = jnp.where(kept, slot, capacity)  # out-of-range slots are dropped by the scatter
  buffers = jnp.zeros((num_experts, capacity, x.shape[-1]), x.dtype)
  buffers = buffers.at[r.expert_ids, slot_or_out].set(x[token], mode="drop")
  return buffers, slot_or_out, kept


def _combine(out_buffers, r: Routing, slot_or_out, kept, dtype):
  gathered = out_buffers.at[r.expert_ids, slot_or_out].get(mode="fill", fill_value=0)  # [T, k, d]
  w = jnp.where(kept, r.weights, 0.0)
  return jnp.einsum("tkd,tk->td", gathered.astype(jnp.float32), w).astype(dtype)


def _expert_ffn(buffers, w_in, w_gate, w_out, activation):
  """buffers [E, C, d] through each expert's MLP -> [E, C, d] (float32 accumulation)."""
  dot = lambda a, w, eq: jnp.einsum(eq, a, w.astype(a.dtype), preferred_element_type=jnp.float32).astype(a.dtype)  # noqa: E731
  h = gated_ffn(dot(buffers, w_in, "ecd,edf->ecf"), None if w_gate is None else dot(buffers, w_gate, "ecd,edf->ecf"),
           activation)
  return dot(h, w_out, "ecf,efd->ecd")


def capacity(tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
  """Slots per expert: ceil(capacity_factor * tokens * k / E), or `tokens` (never drops) when the factor is 0."""
  if capacity_factor <= 0:
    return tokens
  return max(1, math.ceil(capacity_factor * tokens * k / num_experts))


def _dropped(kept, valid):
  live = jnp.ones(kept.shape[:1], bool) if valid is None else valid.astype(bool)
  return jnp.sum(~kept & live[:, None]).astype(jnp.float32)


def capacity_experts(x, r: Routing, w_in, w_gate, w_out, activation: str, capacity_factor: float, valid=None):
  """x [T, d] -> ([T, d], dropped assignments of real tokens as a float32 scalar) with per-expert buffers of fixed
  capacity; tokens with valid [T] false (padding) take no slot and get 0."""
  e = w_in.shape[0]
  c = capacity(x.shape[0], r.expert_ids.shape[1], e, capacity_factor)
  buffers, slot, kept = dispatch(x, r, e, c, valid)
  y = _combine(_expert_ffn(buffers, w_in, w_gate, w_out, activation), r, slot, kept, x.dtype)
  return y, _dropped(kept, valid)


def expert_parallel(x, r: Routing, w_in, w_gate, w_out, activation: str, capacity_factor: float, mesh, valid=None):
  """`capacity_experts` with the experts split over the mesh `expert` axis and the tokens over the batch axes.

  x [T, d] and routing are sharded by token; inside `shard_map`, each device fills [E, C, d] buffers from its own
  tokens, `all_to_all` sends each expert's slice to the device that owns it ([E/n, n*C, d]), the local experts run,
  and a second `all_to_all` brings the results back to be combined locally."""
  token_axes = tuple(a for a in ("data", "fsdp", "expert") if mesh.shape.get(a, 1) > 1)
  tok = P(token_axes or None)
  experts = P("expert")

  def local(x, ids, weights, valid, w_in, w_gate, w_out):
    e = w_in.shape[0] * jax.lax.axis_size("expert")
    rl = Routing(ids, weights, None, None)
    c = capacity(x.shape[0], ids.shape[1], e, capacity_factor)
    buffers, slot, kept = dispatch(x, rl, e, c, valid)
    buffers = jax.lax.all_to_all(buffers, "expert", split_axis=0, concat_axis=1, tiled=True)  # [E/n, n*C, d]
    out = _expert_ffn(buffers, w_in, w_gate, w_out, activation)
    out = jax.lax.all_to_all(out, "expert", split_axis=1, concat_axis=0, tiled=True)  # [E, C, d]
    dropped = _dropped(kept, valid)
    dropped = jax.lax.psum(dropped, token_axes) if token_axes else dropped
    return _combine(out, rl, slot, kept, x.dtype), dropped.astype(jnp.float32)

  gate_spec = None if w_gate is None else experts
  fn = jax.shard_map(local, mesh=mesh, in_specs=(tok, tok, tok, tok, experts, gate_spec, experts),
                     out_specs=(tok, P()), check_vma=False)
  valid = jnp.ones(x.shape[:1], bool) if valid is None else valid.astype(bool)
  return fn(x, r.expert_ids, r.weights, valid, w_in, w_gate, w_out)


def dense_reference(x, r: Routing, w_in, w_gate, w_out, activation: str) -> jax.Array:
  """Every expert on every token, masked by the routing (the plain reference the fast paths are tested against)."""
  e = w_in.shape[0]
  combine = jnp.einsum("tke,tk->te", jax.nn.one_hot(r.expert_ids, e, dtype=jnp.float32), r.weights)
  hp = jax.lax.Precision.HIGHEST
  h_in = jnp.einsum("td,edf->etf", x, w_in, precision=hp)
  h = gated_ffn(h_in, None if w_gate is None else jnp.einsum("td,edf->etf", x, w_gate, precision=hp), activation)
  out = jnp.einsum("etf,efd->etd", h, w_out, precision=hp)
  return jnp.einsum("etd,te->td", out, combine, precision=hp)


class CodedExperts(nnx.Variable):
  """QMoE-coded expert weights for `matmul_impl=pallas` decoding: {name: (codes [C], offsets [E*out + 1], lo [E*out],
  hi [E*out])} plus "dictionary": (entries [D, max_len], lengths [D]); attached by `infer.loading` to unstacked
  models loaded from a QMoE workdir."""


def coded_experts(x, r: Routing, coded: dict, dims: dict, activation: str) -> jax.Array:
  """x [T, d] through the experts straight from their coded ternary streams (one fused decode-matvec per
  assignment, `model/kernels/ternary_matvec.py`). For decode-sized T * k; returns [T, d] in x's dtype."""

  entries, lengths = coded["dictionary"]

  def matvec(name, v, e):
    codes, offsets, lo, hi = coded[name]
    out = dims[name]
    return tm.ternary_matvec(v, codes, offsets, entries, lengths, lo, hi, row_start=e * out, rows=out)

  t, k = r.expert_ids.shape
  rows = []
  for ti in range(t):
    acc = jnp.zeros((1, x.shape[1]), jnp.float32)
    for j in range(k):
      e = r.expert_ids[ti, j]
      xt = x[ti:ti + 1].astype(jnp.float32)
      h = matvec("w_in", xt, e)
      h = gated_ffn(h, matvec("w_gate", xt, e) if "w_gate" in coded else None, activation)
      acc = acc + r.weights[ti, j] * matvec("w_out", h, e)
    rows.append(acc)
  return jnp.concatenate(rows).astype(x.dtype)


MAX_CODED_ASSIGNMENTS = 16  # the coded kernel path serves decode steps; larger calls use the decoded weights


class MoE(nnx.Module):
  """The MoE MLP of a block. x [B, L, D] -> (y [B, L, D], {"load_balance", "router_z", "dropped"} float32 scalars).

  `spec` needs embed_dim, num_experts, experts_per_token, expert_mlp_dim, family, activation, moe_renormalize,
  capacity_factor, init_std, num_layers, weight_dtype and compute_dtype."""

  def __init__(self, spec, rngs: nnx.Rngs):
    self.spec = spec
    d, e, f = spec.embed_dim, spec.num_experts, spec.expert_mlp_dim
    dt = spec.weight_dtype
    normal = lambda shape, std: (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dt)  # noqa: E731
    out_std = spec.init_std / math.sqrt(2 * spec.num_layers)
    self.router = nnx.Param(normal((d, e), spec.init_std).astype(jnp.float32), logical_axes=("embed", None))
    self.w_in = nnx.Param(normal((e, d, f), spec.init_std), logical_axes=("expert", "embed", "mlp"))
    self.w_gate = (nnx.Param(normal((e, d, f), spec.init_std), logical_axes=("expert", "embed", "mlp"))
                   if spec.family == "llama" else None)
    self.w_out = nnx.Param(normal((e, f, d), out_std), logical_axes=("expert", "mlp", "embed"))
    self.coded = None  # CodedExperts when loaded from a QMoE workdir for matmul_impl=pallas

  def __call__(self, x: jax.Array, token_mask: jax.Array | None = None):
    spec = self.spec
    b, l, d = x.shape
    flat = x.reshape(b * l, d).astype(spec.compute_dtype)
    r = route(flat, self.router[...], spec.experts_per_token, spec.moe_renormalize)
    valid = None if token_mask is None else token_mask.reshape(-1)
    aux = aux_losses(r, valid)
    activation = "silu" if spec.family == "llama" else spec.activation
    w_gate = None if self.w_gate is None else self.w_gate[...]
    mesh = jax.sharding.get_abstract_mesh()
    coded = self.coded.get_value() if self.coded is not None else None
    if coded is not None and spec.matmul_impl == "pallas" and b * l * spec.experts_per_token <= MAX_CODED_ASSIGNMENTS:
      dims = {"w_in": spec.expert_mlp_dim, "w_gate": spec.expert_mlp_dim, "w_out": d}
      y, dropped = coded_experts(flat, r, coded, dims, activation), jnp.zeros((), jnp.float32)
    elif mesh is not None and not mesh.empty and mesh.shape.get("expert", 1) > 1:
      y, dropped = expert_parallel(flat, r, self.w_in[...], w_gate, self.w_out[...], activation,
                                   spec.capacity_factor, mesh, valid)
    elif spec.capacity_factor > 0:
      y, dropped = capacity_experts(flat, r, self.w_in[...], w_gate, self.w_out[...], activation,
                                    spec.capacity_factor, valid)
    else:
      y = dropless_experts(flat, r, self.w_in[...], w_gate, self.w_out[...], activation)
      dropped = jnp.zeros((), jnp.float32)
    real = jnp.float32(b * l) if valid is None else jnp.maximum(jnp.sum(valid).astype(jnp.float32), 1.0)
    aux["dropped"] = dropped / (real * spec.experts_per_token)
    return y.reshape(b, l, d), aux
