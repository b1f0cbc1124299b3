"""The streaming runtime: the engine that carries out a layer schedule, activation offload, the training pass."""
