"""Defaults that fit the corpus and the budget: the options `nextchar train` leaves on `auto`.

    sizes = choose_sizes(train_chars=966_000)                 # before the model exists
    reg = choose_regularization(planned_epochs=25.0)          # dropout, weight decay
    epochs = planned_epochs(train_chars, chars_per_step, max_steps, max_minutes, chars_per_s)

Why these rules (the measurements are in docs/training.md, "Defaults"): a character LSTM on a
few MB of text is compute-bound on a CPU, so width is what the time buys; on a small corpus
the same budget is many passes over the text, and then the model memorises it unless it is
regularised. So the model's size follows the corpus size, and dropout and weight decay follow
the number of epochs the budget will run (corpus size and time together).
"""

from __future__ import annotations

from dataclasses import dataclass

# Below this many training characters the model is narrower (fewer parameters to memorise
# with, faster steps, more of them in the budget).
SMALL_CORPUS_CHARS = 300_000
# A rough training speed for the first estimate of the epochs a time budget allows, before the
# run has measured its own (2 cores, LSTM 512, float32: ~15 k chars/s, bf16 ~36 k; a GPU is
# far faster; the trainer replaces this with the measured rate after CALIBRATION_STEPS steps).
CPU_CHARS_PER_S = 15_000.0
CUDA_CHARS_PER_S = 1_000_000.0
CALIBRATION_STEPS = 20
BPTT = 64
# The shortest window auto picks for a short text; a text too short for one stream of it is
# refused, saying how many characters a run needs (min_train_chars).
MIN_BPTT = 8
WINDOWS_PER_STREAM = 8


@dataclass(frozen=True)
class Sizes:
    hidden_size: int
    num_layers: int
    lr: float
    bptt: int
    eval_every: int


@dataclass(frozen=True)
class Regularization:
    dropout: float
    embed_dropout: float
    weight_decay: float


def choose_sizes(train_chars: int) -> Sizes:
    """Model size, learning rate, BPTT and validation interval from the corpus size."""
    eval_every = 100 if train_chars < 2_000_000 else 250  # small corpora turn sooner
    if train_chars < SMALL_CORPUS_CHARS:
        return Sizes(hidden_size=256, num_layers=1, lr=8e-3, bptt=BPTT, eval_every=eval_every)
    return Sizes(hidden_size=512, num_layers=1, lr=8e-3, bptt=BPTT, eval_every=eval_every)


def choose_regularization(planned_epochs: float) -> Regularization:
    """Dropout and weight decay from how many times the budget will show the model its text.

    Up to ~3 epochs: none (dropout only slows a model that cannot memorise yet; the 5 MB
    default corpus sees ~2 in 10 CPU minutes). The issue's 1.1 MB run without dropout was best
    after 4-8 epochs and then memorised; from there on, dropout on the output and the input
    embedding, more the more epochs.
    """
    if planned_epochs < 3:
        return Regularization(dropout=0.0, embed_dropout=0.0, weight_decay=0.01)
    if planned_epochs < 6:
        return Regularization(dropout=0.1, embed_dropout=0.0, weight_decay=0.01)
    if planned_epochs < 30:
        return Regularization(dropout=0.25, embed_dropout=0.05, weight_decay=0.01)
    return Regularization(dropout=0.35, embed_dropout=0.1, weight_decay=0.05)


def choose_bptt(train_chars: int, streams: int = 1) -> int:
    """64, or for a text too short to give `streams` streams of 8 such windows each, the
    longest window that does, but not under MIN_BPTT: a tiny corpus still trains."""
    fits = (train_chars // max(1, streams) - WINDOWS_PER_STREAM) // (WINDOWS_PER_STREAM + 1)
    return max(MIN_BPTT, min(BPTT, fits))


def min_train_chars(streams: int = 1) -> int:
    """The fewest training characters a carried-state run takes: one window of MIN_BPTT + 1 per
    stream (data.StreamBatches)."""
    return streams * (MIN_BPTT + 1) + MIN_BPTT


def choose_batch_size(train_chars: int, bptt: int, world: int = 1) -> int:
    """128 rows per process (big matrix products are what a CPU does fastest), fewer when the
    text cannot fill 128 streams of at least 8 windows each."""
    per_stream = WINDOWS_PER_STREAM * (bptt + 1)
    return max(1, min(128, (train_chars - bptt) // (per_stream * world)))


def planned_epochs(train_chars: int, chars_per_step: int, max_steps: int | None,
                   max_minutes: float | None, chars_per_s: float) -> float:
    """Passes over the training text the budget allows (whichever of steps and time ends
    first)."""
    budgets = []
    if max_steps:
        budgets.append(max_steps * chars_per_step)
    if max_minutes:
        budgets.append(max_minutes * 60.0 * chars_per_s)
    return min(budgets) / max(1, train_chars)
