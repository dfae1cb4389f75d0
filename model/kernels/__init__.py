"""Pallas kernels, one per file, each beside its plain-jnp reference."""
