"""The systemd unit petald installs (``petald install-service``).

``Type=notify``: systemd considers the service started when petald sends ``READY=1`` (once
its span is online and the API listens), so ordering and ``systemctl start`` mean
"routable". The sandbox leaves petald what it needs: its state (identity key), cache
(fingerprints, tokenizer) and runtime (the API socket) directories, TCP and Unix sockets.
``MemoryDenyWriteExecute`` is left out because torch's CPU kernels generate code at run time;
``PrivateDevices`` is left out with ``--device cuda`` (the GPU is a device).
"""

from __future__ import annotations

import getpass
import os
import sys
from collections.abc import Sequence
from pathlib import Path

UNIT_NAME = "petald.service"
ROLES = ("serve", "daemon")


def _quote(arg: str) -> str:
    """One ExecStart argument: systemd's own quoting, with % and $ escaped (specifiers, variables)."""
    text = arg.replace("%", "%%").replace("$", "$$")
    if text and not any(c in text for c in ' \t"\'\\;'):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _has(args: Sequence[str], option: str) -> bool:
    return any(a == option or a.startswith(option + "=") for a in args)


def service_command(args: Sequence[str], system: bool, python: str = sys.executable) -> list[str]:
    """The command line the unit runs: ``petald serve ...`` (or ``daemon``) with the identity
    and socket in systemd's directories unless the arguments name them."""
    args = list(args)
    role = args.pop(0) if args and args[0] in ROLES else "serve"
    command = [python, "-m", "petald.cli.main", role, *args]
    if not _has(args, "--identity"):
        command += ["--identity", "%S/petald/identity.key"]
    if not _has(args, "--socket") and not _has(args, "--no-api"):
        command += ["--socket", "%t/petald/api.sock"]
    return command


def unit_text(args: Sequence[str], system: bool, user: str | None = None, python: str = sys.executable) -> str:
    command = service_command(args, system, python)
    # The identity and socket paths above use specifiers on purpose: leave their % alone.
    exec_start = " ".join(a if a.startswith(("%S/", "%t/")) else _quote(a) for a in command)
    role = command[3]
    what = ("serve a span of a language model's blocks to a petald swarm" if role == "serve"
            else "join a petald swarm as a client and serve the local API")
    cuda = "cuda" in args
    lines = [
        "[Unit]",
        f"Description=petald: {what}",
    ]
    if system:
        lines += ["Wants=network-online.target", "After=network-online.target"]
    lines += [
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={exec_start}",
        "Restart=on-failure",
        "RestartSec=10",
        # Loading blocks and measuring throughput come before READY=1; a first start may also
        # fingerprint the weights.
        "TimeoutStartSec=20min",
        # A stop drains: offline record (<= 5 s), --shutdown-grace (30 s by default), running steps (<= 30 s).
        "TimeoutStopSec=90",
        "KillSignal=SIGTERM",
        "SyslogIdentifier=petald",
        "Environment=PYTHONUNBUFFERED=1",
        "Environment=PETALD_CACHE_DIR=%C/petald",
        "Environment=HF_HOME=%C/petald/huggingface",
        "StateDirectory=petald",
        "StateDirectoryMode=0700",
        "CacheDirectory=petald",
        "RuntimeDirectory=petald",
        # A system unit's socket is for other accounts too (--socket-group): the directory must
        # let them through; the socket's own mode (0600 or 0660) decides who may connect.
        f"RuntimeDirectoryMode={'0755' if system else '0700'}",
        "UMask=0077",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=read-only",
        "PrivateTmp=yes",
        *([] if cuda else ["PrivateDevices=yes"]),
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "SystemCallArchitectures=native",
        "CapabilityBoundingSet=",
    ]
    if system:
        lines += [f"User={user or getpass.getuser()}"]
    lines += ["", "[Install]", f"WantedBy={'multi-user.target' if system else 'default.target'}", ""]
    return "\n".join(lines)


def unit_path(system: bool, name: str = UNIT_NAME) -> Path:
    if system:
        return Path("/etc/systemd/system") / name
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "systemd" / "user" / name
