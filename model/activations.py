"""The MLP nonlinearities by config name (`model.activation`, allowed names in `configs.base.ACTIVATIONS`)."""

from __future__ import annotations

import jax

from configs import base

ACTIVATIONS = {"gelu": lambda a: jax.nn.gelu(a, approximate=True),  # the tanh form (GPT-2's gelu_new)
               "gelu_exact": lambda a: jax.nn.gelu(a, approximate=False), "relu": jax.nn.relu, "silu": jax.nn.silu}
base.check_implemented("model.activation", base.ACTIVATIONS, ACTIVATIONS)
