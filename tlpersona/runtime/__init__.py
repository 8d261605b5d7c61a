"""Floor 0: tensors and devices (batching, the static decoder and its kernels, residual edits,
torchrun ranks). Knows no personas and no chat templates."""
