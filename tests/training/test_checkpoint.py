"""Checkpoints load with weights_only=True; a corrupt, truncated or missing one is one clear
line and exit 1, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nextchar.training import cli
from nextchar.training.checkpoint import load_checkpoint, save_checkpoint
from nextchar.training.errors import CheckpointError


@pytest.fixture
def good_checkpoint(hello_run: tuple[Path, dict]) -> Path:
    return hello_run[0] / "checkpoint.pt"


def test_plain_torch_load_weights_only(good_checkpoint: Path) -> None:
    ckpt = torch.load(good_checkpoint, weights_only=True)
    assert ckpt["format"] == "nextchar-checkpoint"
    assert isinstance(ckpt["model_state"]["embed.weight"], torch.Tensor)


def _damaged(good: Path, tmp_path: Path, kind: str) -> Path:
    bad = tmp_path / "run" / "checkpoint.pt"
    bad.parent.mkdir()
    data = good.read_bytes()
    if kind == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        bad.write_bytes(b"not a checkpoint at all\n" * 10)
    elif kind == "empty":
        bad.write_bytes(b"")
    elif kind == "flipped":
        mid = len(data) // 2
        bad.write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + 64]) +
                        data[mid + 64 :])
    return bad


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "flipped"])
def test_damaged_checkpoint_is_one_line(kind: str, good_checkpoint: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    bad = _damaged(good_checkpoint, tmp_path, kind)
    code = cli.main(["export", str(bad.parent), "-o", str(tmp_path / "art")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith(f"nextchar export: {bad}") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert not (tmp_path / "art").exists()


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nowhere")


def test_not_a_nextchar_checkpoint(tmp_path: Path) -> None:
    torch.save({"model": torch.zeros(2)}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="not a nextchar checkpoint"):
        load_checkpoint(tmp_path / "x.pt")


def test_wrong_shapes_are_a_clear_error(good_checkpoint: Path, tmp_path: Path) -> None:
    """The line names the first tensor that does not fit and both shapes (torch's own first
    line, "Error(s) in loading state_dict for CharRNN:", names nothing)."""
    from nextchar.training.export import export_artifact

    ckpt = load_checkpoint(good_checkpoint)
    ckpt["model_config"]["hidden_size"] = 9
    save_checkpoint(tmp_path / "c.pt", ckpt)
    with pytest.raises(CheckpointError) as e:
        export_artifact(tmp_path / "c.pt", tmp_path / "art")
    assert str(e.value) == (f"{tmp_path / 'c.pt'} does not describe a valid model: "
                            "model_state's rnn.weight_ih_l0 is 8x10, the model_config needs 9x10")


def test_a_vocab_entry_of_two_characters_is_named(good_checkpoint: Path, tmp_path: Path) -> None:
    from nextchar.training.checkpoint import model_from_checkpoint

    ckpt = load_checkpoint(good_checkpoint)
    ckpt["vocab"][2] = "ll"
    with pytest.raises(CheckpointError, match=r"^c.pt does not describe a valid model: vocab "
                                              r"entry 2 is 'll', not one character$"):
        model_from_checkpoint(ckpt, "c.pt")


@pytest.mark.parametrize("unk_id", [999, -1, "x"])
def test_an_unk_id_outside_the_vocabulary_is_not_exported(good_checkpoint: Path, tmp_path: Path,
                                                         unk_id: object) -> None:
    """Exported as is, such an id would fail every call of the served model."""
    from nextchar.training.export import export_artifact

    ckpt = load_checkpoint(good_checkpoint)
    ckpt["unk_id"] = unk_id
    save_checkpoint(tmp_path / "c.pt", ckpt)
    with pytest.raises(CheckpointError) as e:
        export_artifact(tmp_path / "c.pt", tmp_path / "art")
    n = len(ckpt["vocab"])
    assert str(e.value) == (f"{tmp_path / 'c.pt'} does not describe a valid model: unk_id must "
                            f"be None or an id of the vocabulary (0..{n - 1}), got {unk_id!r}")
    assert not (tmp_path / "art").exists()


@pytest.mark.parametrize("content, why", [(b"", "it is empty"),
                                          (b"hello\n" * 10, "it is not a file torch.save wrote")],
                         ids=["empty", "text"])
def test_a_file_that_is_no_checkpoint_says_so(content: bytes, why: str, tmp_path: Path) -> None:
    """Not torch's "Please file an issue ... WeightsUnpickler error:" for a text file."""
    (tmp_path / "notes.pt").write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "notes.pt")
    assert str(e.value) == f"{tmp_path / 'notes.pt'} is not a nextchar checkpoint ({why})"


def test_real_process_exit_status(good_checkpoint: Path, tmp_path: Path) -> None:
    bad = _damaged(good_checkpoint, tmp_path, "truncated")
    proc = subprocess.run([sys.executable, "-m", "nextchar.training.cli", "export",
                           str(bad), "-o", str(tmp_path / "art")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("nextchar export: ") and "Traceback" not in proc.stderr


def test_a_full_disk_is_an_oserror_naming_the_file_and_keeps_the_old_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save into a full disk raised a bare RuntimeError ("unexpected pos ..."), which the
    CLI printed as a traceback; now the write is a plain one, whose OSError names the file."""
    import errno
    import os

    from nextchar.training import checkpoint

    path = save_checkpoint(tmp_path / "checkpoint.pt", {"step": 1})
    before = path.read_bytes()
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f) -> None:
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.f.close()

        def write(self, data) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    with pytest.raises(OSError) as e:
        save_checkpoint(path, {"step": 2})
    assert (e.value.errno, e.value.filename, e.value.strerror) == (
        errno.ENOSPC, str(path), "No space left on device (the previous checkpoint.pt, if any, "
                                 "is kept)")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temp file left


def test_flipped_bytes_inside_a_tensor_are_caught_by_the_records_crc(
        good_checkpoint: Path, tmp_path: Path) -> None:
    """torch.load reads them as other weights without a word; the export would ship them."""
    import struct
    import zipfile

    data = bytearray(good_checkpoint.read_bytes())
    with zipfile.ZipFile(good_checkpoint) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)  # the largest tensor's record
    # The record's data starts after its local header (30 bytes, its name and its extra
    # field, which torch pads for alignment: read from the local header itself).
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    start = info.header_offset + 30 + name_len + extra_len
    for i in range(start + 8, start + 16):
        data[i] ^= 0xFF
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(bad)
    assert str(e.value) == (f"{bad} is damaged: record {info.filename} fails its CRC-32 check; "
                            f"use another checkpoint (best.pt, an older copy) or train again")
