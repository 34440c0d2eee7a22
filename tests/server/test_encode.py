"""Text -> ids: the per-character, the vectorised and the ASCII path give the same ids and the
same error."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nextchar.server.artifact import ENCODE_VECTOR_MIN, Artifact
from nextchar.server.errors import InvalidInput

VOCAB = list("abc XYZ\n.") + ["é", "語", "😀"]  # 1-, 2-, 3- and 4-byte UTF-8 characters
FOREIGN = ["~", "ü", "\ud800", "\U0010ffff", "\x00"]


def artifact(unk: bool) -> Artifact:
    vocab = VOCAB + (["\ufffd"] if unk else [])  # unk_id names the id unknown characters get
    char_to_id = {c: i for i, c in enumerate(vocab)}
    return Artifact(path=Path("."), manifest={}, sha256="", vocab=vocab,
                    unk_id=len(VOCAB) if unk else None, char_to_id=char_to_id)


texts = st.lists(st.sampled_from(VOCAB + FOREIGN), max_size=3 * ENCODE_VECTOR_MIN).map("".join)


@settings(max_examples=300, deadline=None)
@given(texts)
def test_both_paths_agree(text: str) -> None:
    for unk in (False, True):
        a = artifact(unk)
        short, long = a._encode_short(text), a._encode_long(text)
        if short is None:
            assert long is None
        else:
            assert long is not None and short.tolist() == long.tolist()
        if text.isascii():
            assert a._ascii_table is not None
            fast = a._encode_ascii(text, a._ascii_table)
            assert (fast is None) == (short is None)
            assert fast is None or (fast.tolist() == short.tolist() and fast.dtype.name == "int64")


@pytest.mark.parametrize("length", [ENCODE_VECTOR_MIN - 1, ENCODE_VECTOR_MIN, 5 * ENCODE_VECTOR_MIN])
@pytest.mark.parametrize("ascii_only", [False, True])
def test_error_names_the_first_unknown_character_at_any_length(length: int, ascii_only: bool) -> None:
    text = "a" * (length - 3) + ("X~." if ascii_only else "é~ü")
    with pytest.raises(InvalidInput) as e:
        artifact(unk=False).encode(text, index=7)
    assert e.value.message == (f"texts[7]: character '~' (U+007E) at position {length - 2} is not in "
                               f"the model's vocabulary (12 characters; see GetModelInfo)")
    ids = artifact(unk=True).encode(text)
    want = [4, 12, 8] if ascii_only else [9, 12, 12]
    assert ids.tolist()[-3:] == want and ids.dtype.name == "int64"
