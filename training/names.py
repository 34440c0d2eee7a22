"""Model names and versions, as export writes them into the manifest: the server routes by
them (`/v2/models/{name}/versions/{version}`) and `nextchar models` prints them in tab-separated
columns, so a slash, a space, a tab or a newline in one breaks both.

    problem = name_problem("team/model", "--name")   # the line to show, or None when valid
"""

from __future__ import annotations

import re

MAX_CHARS = 128
# The defaults fit: shakespeare-lstm, corpus-gru, hello-rnn, random-rnn, 20261202-052127.
PATTERN = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_CHARS - 1}}}")


def name_problem(value: str, what: str) -> str | None:
    """Why value cannot be a model name or version (one line naming `what`), or None."""
    if PATTERN.fullmatch(value):
        return None
    return (f"{what} {value!r} is refused: names and versions take letters, digits, '.', '_' "
            f"and '-' only (at most {MAX_CHARS}, the first a letter or digit)")
