"""The wire: protocol IDs, limits, frames, the tensor codec, message schemas, errors.

Nothing here knows about models or networks; nothing here imports ``petald.kernels``.
"""
