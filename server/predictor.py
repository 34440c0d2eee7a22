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


@dataclass(frozen=True)
class Limits:
    max_texts_per_request: int
    max_chars_per_text: int
    max_message_bytes: int
    max_top_k: int
    default_top_k: int
    max_queue_texts: int

    @classmethod
    def from_settings(cls, s: ServerSettings) -> Limits:
        return cls(
            max_texts_per_request=s.max_texts_per_request,
            max_chars_per_text=s.max_chars_per_text,
            max_message_bytes=s.max_message_bytes,
            max_top_k=s.max_top_k,
            default_top_k=s.default_top_k,
            max_queue_texts=s.max_queue_texts,
        )


class Predictor:
    def __init__(self, artifact: Artifact, backend: Backend, batcher: Batcher, limits: Limits) -> None:
        self.artifact = artifact
        self.backend = backend
        self.batcher = batcher
        self.limits = limits

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

    async def predict(
        self,
        texts: list[str],
        top_k: int = 0,
        per_position: bool = False,
        deadline: float | None = None,
    ) -> list[TextResult]:
        """deadline: absolute, on the running loop's clock (loop.time())."""
        k = self.resolve_top_k(top_k)
        encoded = self.encode_texts(texts)
        loop = asyncio.get_running_loop()
        items = [
            Item(ids=ids, top_k=k, future=loop.create_future(), deadline=deadline,
                 positions=per_position)
            for ids in encoded
        ]
        return await self.batcher.submit(items)
