"""Training objectives: what a step minimises, from the head and the batch (next-token cross-entropy first)."""
