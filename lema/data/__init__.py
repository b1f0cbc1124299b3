"""Training data: reading examples, tokenization, batching; the shipped demo corpus."""
