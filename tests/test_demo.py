"""`make demo` is the README's first command: it must pass, and pass again in the same folder
(a second run trains afresh instead of stopping at the first run's checkpoint)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[1] / "scripts" / "demo.py"


@pytest.mark.slow
def test_the_demo_runs_twice_in_one_folder(tmp_path: Path) -> None:
    for attempt in (1, 2):
        # A 3-second training budget: what is checked is every step, not the model's quality.
        run = subprocess.run([sys.executable, str(DEMO), "--workdir", str(tmp_path / "demo"),
                              "--max-minutes", "0.05"], capture_output=True, text=True,
                             timeout=600)
        assert run.returncode == 0, f"run {attempt}: {run.stderr[-2000:]}"
        assert "all three seed models predict 'ohlol'" in run.stdout
        assert "demo finished in" in run.stdout
        assert run.stdout.count("server exited with code 0") == 2
    assert (tmp_path / "demo" / "artifact" / "manifest.json").is_file()
