"""Flax NNX model code: transformer, attention dispatch, sharding rules, FLOP counts. Imports nothing from train/infer."""
