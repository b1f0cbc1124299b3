"""Weights on disk and in RAM: safetensors headers, sources and writer, model folders, the Hub."""
