"""The swarm key of a private swarm: 32 random bytes every member holds, in libp2p's file format.

The file is the one go-libp2p and IPFS read (``/key/swarm/psk/1.0.0/``, ``/base16/``, 64 hex
digits), so an operator's tools for ``swarm.key`` files work on ours. ``petald swarm-key FILE``
writes a new one (mode 0600, never over an existing file); ``--swarm-key FILE`` reads it.
``private_network`` is what the key does to every connection.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

SWARM_KEY_HEADER = "/key/swarm/psk/1.0.0/"
SWARM_KEY_ENCODING = "/base16/"
SWARM_KEY_BYTES = 32


class SwarmKeyError(Exception):
    """A swarm key file that cannot be read or written, said in a sentence."""


@dataclass(frozen=True)
class SwarmKey:
    secret: bytes

    def __post_init__(self) -> None:
        if len(self.secret) != SWARM_KEY_BYTES:
            raise ValueError(f"a swarm key is {SWARM_KEY_BYTES} bytes, got {len(self.secret)}")

    @property
    def fingerprint(self) -> str:
        """A short name for the key that gives nothing of it away: for logs and error messages."""
        return hashlib.sha256(b"petald swarm key " + self.secret).hexdigest()[:12]

    def __repr__(self) -> str:  # never the secret, in a log or a traceback
        return f"SwarmKey(fingerprint={self.fingerprint})"


def write_new_swarm_key(path: str | Path) -> SwarmKey:
    """A new random key, written to ``path`` with mode 0600; an existing file is never replaced."""
    path = Path(path).expanduser()
    key = SwarmKey(os.urandom(SWARM_KEY_BYTES))
    text = f"{SWARM_KEY_HEADER}\n{SWARM_KEY_ENCODING}\n{key.secret.hex()}\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise SwarmKeyError(f"{path} already exists: a swarm key is never overwritten (every member holds "
                            "it); remove the file first or write the new key elsewhere") from None
    except OSError as exc:
        raise SwarmKeyError(f"cannot create the swarm key file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return key


def read_swarm_key(path: str | Path) -> SwarmKey:
    """The key in ``path``, or a SwarmKeyError that says what is wrong with the file."""
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="ascii").split()
    except FileNotFoundError:
        raise SwarmKeyError(f"the swarm key file {path} does not exist (petald swarm-key {path} makes one)") \
            from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SwarmKeyError(f"cannot read the swarm key file {path}: {getattr(exc, 'strerror', None) or exc}") \
            from None
    if len(lines) != 3 or lines[0] != SWARM_KEY_HEADER or lines[1] != SWARM_KEY_ENCODING:
        raise SwarmKeyError(f"{path} is not a swarm key file: expected the lines {SWARM_KEY_HEADER}, "
                            f"{SWARM_KEY_ENCODING} and {2 * SWARM_KEY_BYTES} hex digits")
    try:
        secret = bytes.fromhex(lines[2])
    except ValueError:
        secret = b""
    if len(secret) != SWARM_KEY_BYTES:
        raise SwarmKeyError(f"the key in {path} must be {2 * SWARM_KEY_BYTES} hex digits")
    return SwarmKey(secret)
