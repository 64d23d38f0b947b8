"""``pip install petald`` from a built wheel: every file petald reads at run time that is not a
Python module (the C kernels' sources and headers, the dashboard page) ships in the wheel."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_wheel_holds_every_file_petald_reads(tmp_path):
    tracked = subprocess.run(["git", "ls-files", "petald"], cwd=REPO, capture_output=True, text=True, check=True)
    needed = {path for path in tracked.stdout.split() if not path.endswith(".py")}
    assert any(p.endswith(".h") for p in needed) and any(p.endswith(".html") for p in needed)
    # Built from a copy of the tracked files (the build writes build/ and *.egg-info beside them).
    source = tmp_path / "source"
    files = subprocess.run(["git", "ls-files", "petald", "pyproject.toml", "README.md"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for path in files:
        (source / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / path, source / path)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "--wheel-dir", str(tmp_path / "dist"), str(source)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("petald-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    assert needed <= shipped, sorted(needed - shipped)
    entry = next(n for n in shipped if n.endswith("entry_points.txt"))
    assert "petald = petald.cli.main:main" in zipfile.ZipFile(wheel).read(entry).decode()
