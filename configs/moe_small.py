"""A small Switch-style MoE for the QMoE case study, trainable on 2 CPU cores within the main-job budget.

64 experts of width 256 in every other block (Switch-base-128 in miniature: many small experts, load-balancing and
router z-losses), on the default model's width and corpus: 20.0M parameters in total. Routing is top-2 with
renormalized gates (Mixtral): with Switch's top-1 unnormalized gates, a 600-step run kept the gates near 1/E (mean
0.04), so the experts barely contributed (zeroing them moved the validation loss by 0.0065 nats).
Training uses capacity-factor dispatch (2.0): on the 2-core CPU the dropless ragged_dot path computes every expert
for every token (about 4x slower here); dropped assignments are logged as moe_dropped and fall as the router balances.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.model.update(num_experts=64, experts_per_token=2, moe_every=2, expert_mlp_dim=256, moe_renormalize=True,
                 capacity_factor=2.0)
  return c
