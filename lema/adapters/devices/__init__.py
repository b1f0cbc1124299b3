"""Devices: the CPU (real compute, byte accounting, simulated link), CUDA, and probes."""
