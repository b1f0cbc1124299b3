"""Model-level dispatch above the families: ModelSpec, blocks, heads, LoRA state, tiling, decoding, batch contexts."""
