"""petald: run large language models BitTorrent-style.

The package has four rooms that import one way only:
``cli -> p2pnode -> {protocol, kernels}``.
"""

__version__ = "0.1.0"
