"""Metrics sinks: TensorBoard event files and Weights & Biases runs, through their own libraries."""
