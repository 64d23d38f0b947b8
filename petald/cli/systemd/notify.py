"""systemd's readiness protocol (``Type=notify``): datagrams to ``$NOTIFY_SOCKET``.

``READY=1`` once the daemon is routable and its API listens, ``STATUS=...`` for what it is
doing (``systemctl status`` shows it), ``STOPPING=1`` at shutdown. Outside systemd
(no ``NOTIFY_SOCKET``) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(*fields: str) -> bool:
    """Send ``KEY=value`` lines to systemd; returns whether there was a socket to send to."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # A datagram to a full queue would block the caller (the trio loop, say): drop it.
            sock.setblocking(False)
            sock.connect(address)
            sock.send("\n".join(fields).encode())
    except BlockingIOError:
        log.debug("systemd's notify socket %s is full; dropped %s", address, fields)
        return False
    except OSError as exc:  # readiness is a courtesy: never let it stop the daemon
        log.warning("could not notify systemd at %s: %s", address, exc)
        return False
    return True


def status(text: str) -> None:
    # One line: systemd shows STATUS as a single line, and a newline would start a new field.
    notify(f"STATUS={text.splitlines()[0] if text else ''}")
