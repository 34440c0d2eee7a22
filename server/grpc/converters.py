"""nextchar.v1 messages <-> domain values, shared by the servicer and `nextchar batch --local`
(which answers with the same protos, without a transport)."""

from __future__ import annotations

from nextchar.v1 import nextchar_pb2 as pb

from ..predictor import TextResult


def prediction_to_pb(r: TextResult, vocab: list[str]) -> pb.Prediction:
    top = [pb.CharProb(char=vocab[i], prob=float(p), id=int(i))
           for i, p in zip(r.top_ids.tolist(), r.top_probs.tolist(), strict=True)]
    if r.position_ids is None or r.position_probs is None:
        return pb.Prediction(top=top, state=r.state)
    ids = r.position_ids.tolist()
    return pb.Prediction(
        top=top,
        argmax_text="".join(vocab[i] for i in ids),
        positions=[pb.CharProb(char=vocab[i], prob=float(p), id=int(i))
                   for i, p in zip(ids, r.position_probs.tolist(), strict=True)],
        state=r.state,
    )
