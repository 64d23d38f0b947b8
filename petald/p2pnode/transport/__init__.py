"""The libp2p host, its identity and streams of frames: what every other room of p2pnode stands on.

Imports nothing else from p2pnode."""
