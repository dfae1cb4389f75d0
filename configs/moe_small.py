"""A small Switch-style MoE for the QMoE case study, trainable on 2 CPU cores within the main-job budget.

64 experts of width 256 in every other block (Switch-base-128 in miniature: many small experts, top-1 routing with
unnormalized gates, load-balancing loss), on the default model's width and corpus: 12.6M parameters in total, about
4.6M active per token.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.model.update(num_experts=64, experts_per_token=1, moe_every=2, expert_mlp_dim=256, moe_renormalize=False)
  return c
