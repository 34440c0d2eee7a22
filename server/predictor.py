"""One model's Predict: validate, encode, queue in the batcher, and finish on the worker thread.

The data plane (dataplane.py) calls this for every front end; it never sees protobuf. What the
caller wants from a model call is decided here, in the `finish` functions the batcher runs on
its worker thread: softmax and top-k, per-position argmax, the encoded state, the distribution.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from .artifact import Artifact
from .backends.base import Backend, BatchOutput
from .batcher import HIGH, Batcher, Item
from .errors import InvalidInput
from .settings import ServerSettings
from .state import StateCodec


@dataclass
class TextResult:
    top_ids: np.ndarray  # (k,) int64, most likely first
    top_probs: np.ndarray  # (k,) float32
    position_ids: np.ndarray | None = None  # (T,) argmax id after each prefix
    position_probs: np.ndarray | None = None  # (T,)
    position_dists: np.ndarray | None = None  # (T, V) float32, with PredictOpts.position_dists
    state: bytes = b""  # encoded state after the last character, with return_state
    probs: np.ndarray | None = None  # (V,) float32 next-char distribution, with want_probs


@dataclass(frozen=True)
class PredictOpts:
    """Per item: what `finish_predict` computes for it."""

    top_k: int
    positions: bool = False
    want_state: bool = False
    want_probs: bool = False
    position_dists: bool = False  # with positions: every prefix's whole distribution


def softmax(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.float32, copy=True)
    z -= z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


@dataclass(frozen=True)
class Limits:
    max_texts_per_request: int
    max_chars_per_text: int
    max_message_bytes: int
    max_top_k: int
    default_top_k: int
    max_queue_texts: int
    max_streams: int = 256
    max_chars_per_request: int = 262144
    max_queue_chars: int = 1 << 20  # per lane; enforced by the batcher, advertised from here
    low_max_queue_texts: int = 65536  # the low lane's; a batch job sizes its requests by it

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
            max_chars_per_request=s.max_chars_per_request,
            max_queue_chars=s.max_queue_chars,
            low_max_queue_texts=s.low_max_queue_texts,
        )

    def advertised(self, vocab_size: int) -> dict[str, int]:
        """What GetModelInfo and the native HTTP model info say, by the proto's field names:
        the settings, top-k bounded by the model's vocabulary."""
        return {**asdict(self), "max_top_k": min(self.max_top_k, vocab_size),
                "default_top_k": min(self.default_top_k, self.max_top_k, vocab_size)}


# Field tags, lengths and a KServe answer's output names, datatypes and shapes: a bound, not a
# count (4 outputs of at most ~40 bytes each, plus the id a request may echo up to 128).
ANSWER_FRAMING_BYTES = 320


class Predictor:
    def __init__(self, artifact: Artifact, backend: Backend, batcher: Batcher, limits: Limits,
                 name: str = "", version: str = "") -> None:
        self.artifact = artifact
        # What every answer carries besides its predictions: the model's name and version (a
        # repository folder name may be 255 bytes), the artifact's sha256, a KServe answer's
        # tensor names and shapes and its echoed id, with their field tags.
        self._answer_header_bytes = (len(name.encode()) + len(version.encode()) + 64
                                     + ANSWER_FRAMING_BYTES)
        self.backend = backend
        self.batcher = batcher
        self.limits = limits
        self.state_codec = StateCodec.for_artifact(artifact)
        # Upper bound of one CharProb message: tags and lengths, the widest character's UTF-8,
        # a float, an id of up to 3 varint bytes.
        self._char_prob_bytes = 12 + max((len(c.encode()) for c in artifact.vocab), default=1)

    def check_answer_size(self, lengths: list[int], k: int, per_position: bool,
                          want_state: bool, want_probs: bool = False) -> None:
        """Refuses, before any compute, a request whose answer cannot fit max_message_bytes
        (the gRPC send cap would refuse it only after the work was done)."""
        per_text = 4 + k * self._char_prob_bytes
        if want_state:
            per_text += 4 + self.state_codec.size_bytes
        if want_probs:
            per_text += 4 * self.artifact.vocab_size
        size = self._answer_header_bytes + len(lengths) * per_text
        if per_position:
            size += sum(lengths) * (self._char_prob_bytes + 4)  # positions + argmax_text
        limit = self.limits.max_message_bytes
        if size > limit:
            raise InvalidInput(
                f"the answer would be about {size} bytes > max_message_bytes {limit}: send "
                f"fewer or shorter texts{', per_position off' if per_position else ''}, or a "
                f"smaller top_k")

    def finish_predict(self, out: BatchOutput, rows: np.ndarray,
                       items: Sequence[Item]) -> list[TextResult]:
        """On the worker thread: one model call's rows -> each item's TextResult."""
        whole = len(rows) == len(out.logits)  # the common case: no row copy
        probs = softmax(out.logits if whole else out.logits[rows])  # (B, V)
        opts: list[PredictOpts] = [it.params for it in items]
        k_max = max(o.top_k for o in opts)
        top = np.argsort(-probs, axis=1, kind="stable")[:, :k_max]  # (B, k)
        results = []
        for i, (row, it, o) in enumerate(zip(rows.tolist(), items, opts, strict=True)):
            ids_k = top[i, : o.top_k]
            res = TextResult(top_ids=ids_k, top_probs=probs[i, ids_k])
            if o.positions and out.position_logits is not None:
                n = len(it.ids)
                p = softmax(out.position_logits[row, :n])  # (T, V)
                res.position_ids = p.argmax(axis=1)
                res.position_probs = p[np.arange(n), res.position_ids]
                if o.position_dists:
                    res.position_dists = p
            if o.want_state:
                res.state = self.state_codec.encode(out.state[:, row, :])
            if o.want_probs:
                res.probs = probs[i]
            results.append(res)
        return results

    def resolve_top_k(self, top_k: int) -> int:
        lim = self.limits
        bound = min(lim.max_top_k, self.artifact.vocab_size)
        if top_k == 0:
            return min(lim.default_top_k, bound)
        if not 1 <= top_k <= bound:
            raise InvalidInput(f"top_k must be between 1 and {bound} (or 0 for the default "
                               f"{min(lim.default_top_k, bound)}), got {top_k}")
        return top_k

    def encode_texts(self, texts: list[str]) -> list[np.ndarray]:
        lim = self.limits
        if not texts:
            raise InvalidInput("no texts: send at least one text")
        if len(texts) > lim.max_texts_per_request:
            raise InvalidInput(f"too many texts: {len(texts)} > max_texts_per_request "
                               f"{lim.max_texts_per_request}; split the request")
        total = sum(map(len, texts))
        if total > lim.max_chars_per_request:
            raise InvalidInput(f"the request has {total} characters > max_chars_per_request "
                               f"{lim.max_chars_per_request}; split it into smaller requests")
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
        if lengths.shape == (n, 1):  # Triton's batched-scalar layout (ModelConfig dims [1])
            lengths = lengths.reshape(n)
        if lengths.shape != (n,):
            raise InvalidInput(f"lengths must have shape [{n}] or [{n}, 1] (one per ids row), "
                               f"got {list(lengths.shape)}")
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
        total = int(lengths.sum())
        if total > lim.max_chars_per_request:
            raise InvalidInput(f"the request has {total} characters > max_chars_per_request "
                               f"{lim.max_chars_per_request}; split it into smaller requests")
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
        lane: int = HIGH,
        position_probs: bool = False,
    ) -> list[TextResult]:
        """deadline: absolute, on the running loop's clock (loop.time()).

        states: empty, or one encoded state per text (b"" = fresh) that the text continues.
        position_probs (with per_position): each result's (T, V) distributions as well; for
        callers in this process (OpenAI logprobs), not sized by check_answer_size.
        """
        k = self.resolve_top_k(top_k)
        encoded = self.encode_texts(texts)
        self.check_answer_size([len(e) for e in encoded], k, per_position, return_state)
        start_states = self.decode_states(states or [], len(texts))
        loop = asyncio.get_running_loop()
        opts = PredictOpts(k, per_position, return_state,
                           position_dists=per_position and position_probs)
        finish = self.finish_predict
        items = [
            Item(ids=ids, future=loop.create_future(), finish=finish, params=opts,
                 deadline=deadline, positions=per_position, state=start, lane=lane)
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
        lane: int = HIGH,
    ) -> list[TextResult]:
        """Rows from `encode_texts` or `check_ids` through the batcher, as `predict` does.

        want_probs: every result also carries the whole next-char distribution (`probs`).
        """
        k = self.resolve_top_k(top_k)
        self.check_answer_size([len(r) for r in rows], k, False, False, want_probs)
        loop = asyncio.get_running_loop()
        opts = PredictOpts(k, want_probs=want_probs)
        finish = self.finish_predict
        items = [Item(ids=ids, future=loop.create_future(), finish=finish, params=opts,
                      deadline=deadline, lane=lane) for ids in rows]
        return await self.batcher.submit(items)
