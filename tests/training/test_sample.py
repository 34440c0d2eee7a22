"""`python -m nextchar.training.sample`: text from a checkpoint, and its usage errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from nextchar.training import sample


def test_sample_continues_the_prompt(hello_run: tuple[Path, dict],
                                     capsys: pytest.CaptureFixture) -> None:
    run, _ = hello_run
    assert sample.main([str(run), "--prompt", "h", "--chars", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == "holol\n"


@pytest.mark.parametrize("flag, value, message", [
    ("--temperature", "nan", "--temperature must be >= 0 and finite, got nan"),
    ("--temperature", "inf", "--temperature must be >= 0 and finite, got inf"),
    ("--temperature", "-1", "--temperature must be >= 0 and finite, got -1.0"),
    ("--chars", "-1", "--chars must be >= 0, got -1"),
    ("--seed", "18446744073709551616", "--seed must be in -2**63..2**64-1, got "
                                       "18446744073709551616"),
])
def test_a_bad_value_is_a_usage_error(flag: str, value: str, message: str,
                                      hello_run: tuple[Path, dict],
                                      capsys: pytest.CaptureFixture) -> None:
    """A NaN temperature made every probability NaN: torch.multinomial's traceback."""
    run, _ = hello_run
    with pytest.raises(SystemExit) as e:
        sample.main([str(run), "--prompt", "h", "--chars", "20", flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: nextchar-sample ")
    assert err.splitlines()[-1] == f"nextchar-sample: error: {message}"
