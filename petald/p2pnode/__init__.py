"""The node: libp2p host, server role, client role and routing.

Imports ``petald.protocol`` and ``petald.kernels``; never ``petald.cli``.
"""
