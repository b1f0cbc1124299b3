"""Use cases on the ports: engine, model facade, trainer, generation, merge, conversion, benchmarking."""
