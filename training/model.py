"""The models: the seed tutorial's three programs, grown up. Pure: no I/O, no CLI.

`CharRNN` (Embedding -> RNN/GRU/LSTM -> Linear) is the served model. Its `forward` is the export
signature every backend runs:

    forward(ids (B, T) int64, lengths (B,) int64, state (S, B, H) float32)
        -> logits (B, V)               next-char logits at each sequence's own last position
           state_out (S, B, H)         state after each sequence's last real character
           position_logits (B, T, V)   logits at every position (zeros past a sequence's end)

S is `num_layers` for rnn/gru and `2 * num_layers` for lstm (h stacked over c). Right padding
never leaks into an answer: packing feeds each sequence only its own `lengths[b]` steps, so a
padded row equals the same sequence run alone (tested to 1e-5 in eager, TorchScript and ONNX).

`OneHotRNNCell` and `OneHotRNN` are working counterparts of the seed's first two programs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

CELLS = ("rnn", "gru", "lstm")


@dataclass
class CharRNNConfig:
    vocab_size: int
    embed_dim: int = 64
    hidden_size: int = 256
    num_layers: int = 2
    cell: str = "rnn"  # rnn (tanh, the seed's) | gru | lstm
    dropout: float = 0.0  # training only: between layers and on the top layer's output
    embed_dropout: float = 0.0  # training only: on the embedded input characters

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {self.cell!r}")
        if min(self.vocab_size, self.embed_dim, self.hidden_size, self.num_layers) < 1:
            raise ValueError(f"sizes must be >= 1: {self}")
        if not (0.0 <= self.dropout < 1.0 and 0.0 <= self.embed_dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1): {self}")

    @property
    def state_layers(self) -> int:
        """S, the first dimension of the state tensor."""
        return 2 * self.num_layers if self.cell == "lstm" else self.num_layers

    def to_dict(self) -> dict:
        return asdict(self)


def _pack(x: torch.Tensor, lengths: torch.Tensor, ids: torch.Tensor) -> PackedSequence:
    """pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False), the same
    numbers, with the batch order moved to the device of ids (and x) by type_as: torch's
    helper moves it with .to(x.device), which a trace records as a constant, the tracing
    device, so a model.ts traced on the CPU would fail on CUDA. type_as stays an op of the
    trace."""
    # Packing reads the lengths on the CPU, whatever the device: this constant is right on all.
    sorted_lengths, order = torch.sort(lengths.cpu(), descending=True)
    order = order.type_as(ids)  # int64 both
    data, batch_sizes = torch._pack_padded_sequence(x.index_select(0, order), sorted_lengths,
                                                    True)
    return PackedSequence(data, batch_sizes, order, torch.argsort(order))


class CharRNN(nn.Module):
    def __init__(self, config: CharRNNConfig) -> None:
        super().__init__()
        self.config = config
        rnn_cls = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[config.cell]
        self.is_lstm = config.cell == "lstm"
        self.num_layers = config.num_layers
        self.hidden_size = config.hidden_size
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim)
        self.rnn = rnn_cls(
            config.embed_dim,
            config.hidden_size,
            num_layers=config.num_layers,
            batch_first=True,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        self.drop = nn.Dropout(config.dropout)
        self.embed_drop = nn.Dropout(config.embed_dropout)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)

    def set_dropout(self, dropout: float, embed_dropout: float) -> None:
        """Changes the training-time dropout in place (no weights depend on it): the trainer
        settles it once it has measured how many epochs the budget allows."""
        self.config.dropout, self.config.embed_dropout = dropout, embed_dropout
        self.drop.p, self.embed_drop.p = dropout, embed_dropout
        if self.num_layers > 1:
            self.rnn.dropout = dropout

    def initial_state(self, batch_size: int) -> torch.Tensor:
        p = self.head.weight
        return torch.zeros(self.config.state_layers, batch_size, self.hidden_size,
                           dtype=p.dtype, device=p.device)

    def _run(self, x: torch.Tensor, state: torch.Tensor, packed_lengths: torch.Tensor | None,
             ids: torch.Tensor | None = None):
        """Runs the core on embedded input (of `ids`, needed with packed_lengths); returns
        (outputs, state_out) with state as (S, B, H)."""
        inp: torch.Tensor | PackedSequence = x
        if packed_lengths is not None:
            assert ids is not None
            inp = _pack(x, packed_lengths, ids)
        if self.is_lstm:
            h0, c0 = state[: self.num_layers].contiguous(), state[self.num_layers :].contiguous()
            out, (h, c) = self.rnn(inp, (h0, c0))
            state_out = torch.cat([h, c], 0)
        else:
            out, state_out = self.rnn(inp, state.contiguous())
        if packed_lengths is not None:
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return out, state_out

    def forward(
        self, ids: torch.Tensor, lengths: torch.Tensor, state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.embed(ids)  # (B, T, E)
        out, state_out = self._run(x, state, lengths, ids)  # (B, T, H), (S, B, H)
        # The top layer's h after each sequence's own last step is its last real output.
        last_h = state_out[self.num_layers - 1]  # (B, H)
        logits = self.head(last_h)  # (B, V)
        # Past a row's length `out` is zero, but head(0) is the bias: zero those rows, as the
        # artifact contract promises. ones_like keeps B and T dynamic under tracing and ONNX
        # export, and it and type_as follow ids' device in a trace, where an
        # arange(device=ids.device) or .to(ids.device) is the tracing device as a constant.
        positions = torch.ones_like(ids).cumsum(1)  # (B, T): 1..T
        valid = (positions <= lengths.type_as(ids).unsqueeze(1)).to(out.dtype)  # (B, T)
        position_logits = self.head(out) * valid.unsqueeze(-1)  # (B, T, V)
        return logits, state_out, position_logits

    def forward_train(
        self, ids: torch.Tensor, state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-length (unpadded) sequences: logits at every position and the final state.

        Training uses this path: no packing overhead, and the state carries across truncated
        BPTT windows (detach it between windows).
        """
        if state is None:
            state = self.initial_state(ids.shape[0])
        out, state_out = self._run(self.embed_drop(self.embed(ids)), state, None)  # (B, T, H)
        return self.head(self.drop(out)), state_out  # (B, T, V), (S, B, H)


class OneHotRNNCell(nn.Module):
    """The seed's first program: an RNNCell stepped by hand; its hidden state is the logits."""

    def __init__(self, vocab_size: int, hidden_size: int | None = None) -> None:
        super().__init__()
        # As in the seed, hidden_size == vocab_size so the hidden vector scores each character.
        self.hidden_size = hidden_size or vocab_size
        self.vocab_size = vocab_size
        self.cell = nn.RNNCell(vocab_size, self.hidden_size)

    def forward(self, one_hot: torch.Tensor) -> torch.Tensor:
        """one_hot (T, B, V) float -> logits (T, B, V), one RNNCell call per step."""
        hidden = torch.zeros(one_hot.shape[1], self.hidden_size, device=one_hot.device)
        steps = []
        for x_t in one_hot:
            hidden = self.cell(x_t, hidden)
            steps.append(hidden)
        return torch.stack(steps)


class OneHotRNN(nn.Module):
    """The seed's second program: nn.RNN over one-hot input, hidden state as the logits."""

    def __init__(self, vocab_size: int, hidden_size: int | None = None, num_layers: int = 1) -> None:
        super().__init__()
        self.hidden_size = hidden_size or vocab_size
        self.num_layers = num_layers
        self.rnn = nn.RNN(vocab_size, self.hidden_size, num_layers=num_layers)

    def forward(self, one_hot: torch.Tensor) -> torch.Tensor:
        """one_hot (T, B, V) float -> logits (T, B, V)."""
        h0 = torch.zeros(self.num_layers, one_hot.shape[1], self.hidden_size, device=one_hot.device)
        out, _ = self.rnn(one_hot, h0)
        return out
