"""Adapters: what touches files, devices and the network, each satisfying a port by shape."""
