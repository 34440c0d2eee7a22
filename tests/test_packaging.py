"""Every Python package folder ends up in the built wheel: a new subpackage cannot silently fall
out of the install (pyproject.toml maps the folders onto `nextchar` by hand)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Top-level folder -> the import package it becomes.
FOLDERS = {"proto/nextchar": "nextchar", "server": "nextchar.server", "client": "nextchar.client",
           "training": "nextchar.training"}


def _packages_on_disk() -> set[str]:
    found = set()
    for folder, package in FOLDERS.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            found.add(".".join([package, *rel.parts]))
    return found


def test_every_package_folder_is_in_the_wheel(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("nextchar-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    in_wheel = {n.rsplit("/", 1)[0].replace("/", ".") for n in names if n.endswith("/__init__.py")}
    missing = _packages_on_disk() - in_wheel
    assert not missing, f"package folders missing from the wheel (pyproject.toml packages): {missing}"
