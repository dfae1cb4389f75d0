"""Post-training compression: calibration (`calibrate`), SparseGPT, Wanda and GPTQ with their baselines and
OWL layer sparsities (`sparsegpt`, `wanda`, `gptq`, `obs`, `quantizer`), whole-model runs and compressed workdirs (`pipeline`, `storage`), and QMoE (`qmoe`,
`ternary_code`). `python -m infer.compress` is the command line."""
