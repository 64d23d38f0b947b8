"""The node's Ed25519 identity, kept in a key file so its peer ID is stable across restarts."""

from __future__ import annotations

import os
from pathlib import Path

from libp2p.crypto.ed25519 import Ed25519PrivateKey, create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID


def load_or_create_identity(path: str | Path | None) -> KeyPair:
    """Read the key in ``path``, or create it (mode 0600) if the file does not exist.

    With no path the identity is ephemeral: a fresh peer ID each run.
    """
    if path is None:
        return create_new_key_pair()
    path = Path(path).expanduser()
    if path.exists():
        raw = path.read_bytes()
        if len(raw) != 32:
            raise ValueError(f"{path} is not a petald identity file (expected a 32-byte Ed25519 seed)")
        private = Ed25519PrivateKey.from_bytes(raw)
        return KeyPair(private, private.get_public_key())
    pair = create_new_key_pair()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pair.private_key.to_bytes()[:32])
    return pair


def peer_id_of(key_pair: KeyPair) -> str:
    """The peer ID (base58) this key pair gives a node."""
    return ID.from_pubkey(key_pair.public_key).to_base58()
