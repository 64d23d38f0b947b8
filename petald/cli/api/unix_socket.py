"""Where the local API's Unix socket lives, and claiming it safely.

A socket file left behind by a daemon that died is removed; one that a live daemon still
answers on is never taken over (Hypercorn itself would silently unlink it).
"""

from __future__ import annotations

import grp
import os
import socket
import stat
from pathlib import Path

SOCKET_BACKLOG = 128
_MAX_UNIX_PATH = 107  # sun_path holds 108 bytes including the terminating NUL


class SocketInUseError(OSError):
    """Another live petald (or anything else) answers on the socket path."""


def default_socket_path() -> Path:
    """``$XDG_RUNTIME_DIR/petald/api.sock`` where a session has a runtime directory, else
    ``~/.petald/api.sock``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "petald" / "api.sock"
    return Path.home() / ".petald" / "api.sock"


def socket_answers(path: Path, timeout: float = 1.0) -> bool:
    """Whether something accepts connections on the Unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(timeout)
        try:
            probe.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            return False
        except OSError:
            return False
        return True


# What the person can do when a live daemon holds the socket, by command (each names only its own options).
IN_USE_HINTS = {"serve": "stop it, or give this one another --socket (or --no-api)",
                "daemon": "stop it (one daemon serves every command of this machine), or give this one another --socket"}


def check_socket_free(path: Path, command: str = "serve") -> None:
    """Raise a sentence if ``path`` cannot be ours: too long, not a socket, or in use (the hint
    names ``command``'s own options)."""
    if len(os.fsencode(path)) > _MAX_UNIX_PATH:
        raise OSError(f"the socket path {path} is longer than {_MAX_UNIX_PATH} bytes, the Unix limit: "
                      "choose a shorter --socket")
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket: remove it or choose another --socket")
    if socket_answers(path):
        raise SocketInUseError(f"another petald daemon is already serving its API on {path}: "
                               f"{IN_USE_HINTS[command]}")


def claim_socket(path: Path, group: str | None = None) -> tuple[socket.socket, int]:
    """A listening Unix socket at ``path``, readable only by its owner (0600), or by ``group``
    too (0660); a stale socket file is replaced. Returns the socket and the file's inode, so
    that shutdown removes only the file it created."""
    check_socket_free(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    gid = None
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise OSError(f"--socket-group {group!r}: no such group on this machine") from None
    path.unlink(missing_ok=True)  # stale: check_socket_free found nobody answering
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The umask makes the file private from the moment it exists; chmod afterwards would leave
    # a window in which another user could connect.
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    if gid is not None:
        os.chown(path, -1, gid)
        os.chmod(path, 0o660)
    sock.listen(SOCKET_BACKLOG)
    return sock, path.stat().st_ino


def release_socket(path: Path, inode: int) -> None:
    """Remove the socket file if it is still the one we created."""
    try:
        if path.lstat().st_ino == inode:
            path.unlink()
    except FileNotFoundError:
        pass
