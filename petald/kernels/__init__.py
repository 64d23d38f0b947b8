"""Compute: model sources, transformer blocks, KV caches, sampling, the executor.

Nothing here knows about networks; nothing here imports ``petald.protocol``.
"""
