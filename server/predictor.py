"""The transport-free core of Predict: validate, encode, batch, decode.

Servicers for any protocol (nextchar.v1, KServe V2) call this; it never sees protobuf.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from .artifact import Artifact
from .backends.base import Backend
from .batcher import Batcher, Item, TextResult
from .errors import InvalidInput
from .settings import ServerSettings
from .state import StateCodec


@dataclass(frozen=True)
class Limits:
    max_texts_per_request: int
    max_chars_per_text: int
    max_message_bytes: int
    max_top_k: int
    default_top_k: int
    max_queue_texts: int
    max_streams: int = 256

    @classmethod
    def from_settings(cls, s: ServerSettings) -> Limits:
        return cls(
            max_texts_per_request=s.max_texts_per_request,
            max_chars_per_text=s.max_chars_per_text,
            max_message_bytes=s.max_message_bytes,
            max_top_k=s.max_top_k,
            default_top_k=s.default_top_k,
            max_queue_texts=s.max_queue_texts,
            max_streams=s.max_streams,
        )


class Predictor:
    def __init__(self, artifact: Artifact, backend: Backend, batcher: Batcher, limits: Limits) -> None:
        self.artifact = artifact
        self.backend = backend
        self.batcher = batcher
        self.limits = limits
        self.state_codec = StateCodec.for_artifact(artifact)

    def resolve_top_k(self, top_k: int) -> int:
        lim = self.limits
        if top_k == 0:
            return min(lim.default_top_k, self.artifact.vocab_size)
        bound = min(lim.max_top_k, self.artifact.vocab_size)
        if not 1 <= top_k <= bound:
            raise InvalidInput(f"top_k must be between 1 and {bound} (or 0 for the default "
                               f"{lim.default_top_k}), got {top_k}")
        return top_k

    def encode_texts(self, texts: list[str]) -> list[np.ndarray]:
        lim = self.limits
        if not texts:
            raise InvalidInput("no texts: send at least one text")
        if len(texts) > lim.max_texts_per_request:
            raise InvalidInput(f"too many texts: {len(texts)} > max_texts_per_request "
                               f"{lim.max_texts_per_request}; split the request")
        encoded = []
        for i, text in enumerate(texts):
            if not text:
                raise InvalidInput(f"texts[{i}] is empty: every text needs at least one character")
            if len(text) > lim.max_chars_per_text:
                raise InvalidInput(f"texts[{i}] has {len(text)} characters > max_chars_per_text "
                                   f"{lim.max_chars_per_text}")
            encoded.append(self.artifact.encode(text, i))
        return encoded

    def check_ids(self, ids: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
        """Right-padded ids (N, T) + lengths (N,) -> one int64 row per text, under the same
        limits as texts (KServe V2 `ids` input). Padding past a row's length is never read."""
        lim = self.limits
        if ids.ndim != 2:
            raise InvalidInput(f"ids must be 2-D [N, T], got shape {list(ids.shape)}")
        n, t = ids.shape
        if n == 0:
            raise InvalidInput("no texts: send at least one row of ids")
        if n > lim.max_texts_per_request:
            raise InvalidInput(f"too many texts: {n} > max_texts_per_request "
                               f"{lim.max_texts_per_request}; split the request")
        if lengths.shape != (n,):
            raise InvalidInput(f"lengths must have shape [{n}] (one per ids row), got "
                               f"{list(lengths.shape)}")
        bad = np.flatnonzero((lengths < 1) | (lengths > t))
        if bad.size:
            i = int(bad[0])
            raise InvalidInput(f"lengths[{i}] = {int(lengths[i])} is outside 1..{t} (T, the "
                               f"ids row width)")
        over = np.flatnonzero(lengths > lim.max_chars_per_text)
        if over.size:
            i = int(over[0])
            raise InvalidInput(f"texts[{i}] has {int(lengths[i])} characters > "
                               f"max_chars_per_text {lim.max_chars_per_text}")
        v = self.artifact.vocab_size
        rows = []
        for i in range(n):
            row = ids[i, : int(lengths[i])].astype(np.int64, copy=True)
            out_of_range = np.flatnonzero((row < 0) | (row >= v))
            if out_of_range.size:
                pos = int(out_of_range[0])
                raise InvalidInput(f"ids[{i}][{pos}] = {int(row[pos])} is not a vocabulary id "
                                   f"(0..{v - 1}; see GetModelInfo)")
            rows.append(row)
        return rows

    async def predict(
        self,
        texts: list[str],
        top_k: int = 0,
        per_position: bool = False,
        deadline: float | None = None,
        states: list[bytes] | None = None,
        return_state: bool = False,
    ) -> list[TextResult]:
        """deadline: absolute, on the running loop's clock (loop.time()).

        states: empty, or one encoded state per text (b"" = fresh) that the text continues.
        """
        k = self.resolve_top_k(top_k)
        encoded = self.encode_texts(texts)
        start_states = self.decode_states(states or [], len(texts))
        loop = asyncio.get_running_loop()
        items = [
            Item(ids=ids, top_k=k, future=loop.create_future(), deadline=deadline,
                 positions=per_position, state=start, want_state=return_state)
            for ids, start in zip(encoded, start_states, strict=True)
        ]
        return await self.batcher.submit(items)

    def decode_states(self, states: list[bytes], n_texts: int) -> list[np.ndarray | None]:
        if not states:
            return [None] * n_texts
        if len(states) != n_texts:
            raise InvalidInput(f"states has {len(states)} entries for {n_texts} texts: send none "
                               f"or one per text (empty bytes for a fresh text)")
        return [self.state_codec.decode(b, f"states[{i}]") if b else None
                for i, b in enumerate(states)]

    async def predict_ids(
        self,
        rows: list[np.ndarray],
        top_k: int = 0,
        deadline: float | None = None,
        want_probs: bool = False,
    ) -> list[TextResult]:
        """Rows from `encode_texts` or `check_ids` through the batcher, as `predict` does.

        want_probs: every result also carries the whole next-char distribution (`probs`).
        """
        k = self.resolve_top_k(top_k)
        loop = asyncio.get_running_loop()
        items = [Item(ids=ids, top_k=k, future=loop.create_future(), deadline=deadline,
                      want_probs=want_probs) for ids in rows]
        return await self.batcher.submit(items)
