"""Tools around training: convert, quantize, merge, generation, benchmarking."""
