"""Flax NNX model code: transformer, MoE, attention dispatch, GPipe pipeline, int8 formats, sharding rules, FLOP
counts, Hugging Face weights and the Pallas kernels. Imports configs only."""
