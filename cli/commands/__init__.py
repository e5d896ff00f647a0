"""One module per command; each exposes ``register(app)``. Modules import torch lazily (fast ``--help``)."""
