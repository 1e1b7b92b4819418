"""The shared core under every method: hook names, rotary embedding, splicing, checkpoints,
configs, batch order and the training loop.

Each method folder (``activations``, ``qk``, ``gated``, ``toys``, ``tracing``, ``circuit``) is
built on these modules; nothing here imports a method folder.
"""
