"""The rooms import one way only (docs/architecture.md): cli -> p2pnode -> {protocol, kernels};
inside p2pnode, server and client never import each other, transport imports nothing else of
p2pnode, and routing holds pure decisions. Checked on the source, so a new import that breaks
a rule fails here rather than in a reviewer's head."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import petald

PACKAGE = Path(petald.__file__).parent
MAX_MODULE_LINES = 450

# room -> rooms it must never import (by dotted prefix)
FORBIDDEN = {
    "petald.vocabulary": ("petald",),  # below every room: it imports nothing of petald
    "petald.protocol": ("petald.kernels", "petald.p2pnode", "petald.cli"),
    "petald.kernels": ("petald.protocol", "petald.p2pnode", "petald.cli"),
    "petald.p2pnode": ("petald.cli",),
    "petald.p2pnode.transport": ("petald.p2pnode.swarm", "petald.p2pnode.routing", "petald.p2pnode.server",
                                 "petald.p2pnode.client"),
    "petald.p2pnode.routing": ("petald.p2pnode.transport", "petald.p2pnode.swarm", "petald.p2pnode.server",
                               "petald.p2pnode.client"),
    "petald.p2pnode.swarm": ("petald.p2pnode.server", "petald.p2pnode.client"),
    "petald.p2pnode.server": ("petald.p2pnode.client",),
    "petald.p2pnode.client": ("petald.p2pnode.server",),
}


def _modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), path))
    return found


def _imports(module: str, path: Path) -> set[str]:
    names: set[str] = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    # ``from petald import DistributedModel`` inside a room is an import of the module behind it.
    return {petald._PUBLIC.get(name.removeprefix("petald."), name) if name.count(".") == 1 else name
            for name in names}


def _within(name: str, room: str) -> bool:
    return name == room or name.startswith(room + ".")


@pytest.mark.parametrize(("module", "path"), _modules(), ids=lambda v: v if isinstance(v, str) else "")
def test_module_imports_follow_the_rooms(module, path):
    broken = []
    for room, forbidden in FORBIDDEN.items():
        if not _within(module, room):
            continue
        broken += [name for name in _imports(module, path) if any(_within(name, f) for f in forbidden)]
    assert not broken, f"{module} imports {sorted(set(broken))} against the rooms' rules"


def test_no_module_is_over_the_size_limit():
    long = {str(path.relative_to(PACKAGE.parent)): n for _, path in _modules()
            if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"over {MAX_MODULE_LINES} lines: {long}"


def test_public_api_names_resolve():
    import subprocess
    import sys

    # In a fresh interpreter: ``import petald`` alone must stay light (no torch), and every public
    # name must import from the top.
    code = ("import sys, petald; assert 'torch' not in sys.modules, 'import petald pulled in torch';"
            "[getattr(petald, n) for n in petald.__all__]; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "ok", result.stderr
    from petald import DistributedModel
    from petald.p2pnode.client.distributed_model import DistributedModel as Defined
    assert DistributedModel is Defined
