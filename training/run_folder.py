"""The run folder (`--out`): what a run writes there, when a folder may be written, and what
`--overwrite` clears. Nothing is replaced or mixed with another run by surprise: a folder that
holds anything is written only with --resume or --overwrite."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import BEST_FILENAME, FILENAME, load_checkpoint
from .errors import CheckpointError, TrainingError

METRICS_FILENAME, CURVE_FILENAME = "metrics.json", "loss.png"
# Everything a run writes into its folder: what --overwrite clears before a new run starts.
RUN_FILES = (FILENAME, BEST_FILENAME, METRICS_FILENAME, CURVE_FILENAME)


def check_out_folder(out: Path, resume: bool, overwrite: bool, resumable: bool = True) -> None:
    """Before anything is read: --out must be a folder or not exist yet (under folders), and
    one that holds anything (a run, or files of its own) is written only with --resume or
    --overwrite, so that nothing is replaced or mixed with another run by surprise."""
    for folder in [out, *out.parents]:
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                where = "is a file" if folder == out else f"is under {folder}, a file"
                raise TrainingError(f"--out {out} {where}, not a folder: choose another --out")
            break
    if resume or overwrite or not out.is_dir():
        return
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if FILENAME in entries:
        resume_hint = "pass --resume to continue that run or " if resumable else "pass "
        raise TrainingError(f"{out / FILENAME} exists: {resume_hint}--overwrite to replace it")
    run_files = [name for name in entries if name in RUN_FILES]
    if run_files:
        raise TrainingError(f"{out} holds a run's {', '.join(run_files)}: pass --overwrite to "
                            "replace it")
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    raise TrainingError(f"{out} is not empty ({shown}) and holds no run: choose a new or empty "
                        "--out, or pass --overwrite to write the run beside those files")


def clear_run(out: Path) -> list[str]:
    """Deletes the files an earlier run wrote into out (--overwrite), so that none of them
    (a best.pt of another model, say) outlives it; returns their names."""
    gone = []
    for name in RUN_FILES:
        if (out / name).is_file():
            (out / name).unlink()
            gone.append(name)
    return gone


def holds_only_a_hello_run(out: Path) -> bool:
    """Whether out holds the hello preset's files and nothing else: training it again writes
    the same model (fixed seeds, float32 on the CPU), so replacing them loses nothing."""
    if not out.is_dir():
        return False
    names = {p.name for p in out.iterdir()}
    if FILENAME not in names or not names <= {FILENAME, CURVE_FILENAME}:
        return False
    try:
        train_config = load_checkpoint(out / FILENAME).get("train_config") or {}
    except CheckpointError:
        return False
    return isinstance(train_config, dict) and train_config.get("preset") == "hello"
