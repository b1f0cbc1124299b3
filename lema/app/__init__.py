"""Use cases on the ports, in rooms: runtime (streaming), training, parallel, tools; bootstrap.py composes them."""
