"""The frozen base: the one reader of checkpoints, their layouts (transformers' own renames and expert
stacking), Mixture-of-Experts blocks, plausible config sizes, quantization through bitsandbytes,
synthetic checkpoints."""
