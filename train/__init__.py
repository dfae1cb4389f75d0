"""Training: the set-up built once from a config (`setup`), data pipeline, BPE training, pure steps, optimizer,
validation loss, metrics and the loop that ties them. Imports configs, model and workdir, never infer."""
