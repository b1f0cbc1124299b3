"""The model's math: ModelSpec, units, blocks, heads, rope, matmul and LoRA (pure functions)."""
