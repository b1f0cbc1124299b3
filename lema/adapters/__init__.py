"""Adapters: the code that touches files, devices and the network, behind lema.ports."""
