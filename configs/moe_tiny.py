"""Tiny MoE preset for tests and smoke runs: 8 experts, top-2, MoE in every other block."""

from configs import tiny


def get_config():
  c = tiny.get_config()
  c.model.update(num_experts=8, experts_per_token=2, moe_every=2, expert_mlp_dim=128)
  return c
