"""The training loop: the hello preset and character-level language modelling.

    python -m nextchar.training.cli train --preset hello                 # the seed's task
    python -m nextchar.training.cli train --max-minutes 2 --out runs/lm  # Shakespeare
    python -m nextchar.training.cli train --corpus my_texts/ --out runs/mine
    torchrun --standalone --nproc_per_node 2 -m nextchar.training.cli train --out runs/ddp

Truncated BPTT with the state carried between windows (each batch row continues the row
before it), AdamW with linear warmup and cosine decay to `min_lr_ratio * lr` over the step or
time budget, optional bf16 autocast, gradient clipping, periodic validation in nats and bits per
character, a checkpoint after every validation, a loss-curve PNG. Under torchrun, DDP over gloo:
every rank trains on its own streams and only rank 0 validates and writes. A loss that is not
a number stops the run (diverged); SIGINT and SIGTERM save the current step, then stop.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import autoconfig, data, hello
from .checkpoint import (
    BEST_FILENAME,
    FILENAME,
    finite_or_none,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from .device import precision_name, resolve_device, resolve_precision
from .errors import CheckpointError, CorpusError, Interrupted, TrainingError
from .model import CharRNN, CharRNNConfig
from .names import name_problem
from .run_folder import (
    CURVE_FILENAME,
    METRICS_FILENAME,
    check_out_folder,
    clear_run,
    holds_only_a_hello_run,
)

LN2 = math.log(2)


AUTO_FIELDS = ("hidden_size", "num_layers", "dropout", "embed_dropout", "batch_size", "bptt",
               "lr", "weight_decay", "eval_every")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
MAX_THREADS = 1024
# Wider is past any machine's memory (an LSTM 2**31 wide is 275 GB), and torch cannot even
# take a size from 2**63 on.
MAX_WIDTH = 2**31 - 1
# Deeper stacks do not train as char-RNNs (gradients through that many tanh layers vanish), and
# torch builds one module per layer: 5,000 layers take ~3 s, 100,000 would take many minutes
# before the first step, with no message.
MAX_LAYERS = 64


@dataclass
class TrainConfig:
    """Everything a language-model run depends on; saved in its checkpoint. `None` in a field
    of AUTO_FIELDS means auto: chosen from the corpus size and the budget (autoconfig.py), and
    the checkpoint records the value chosen."""

    out: str = "runs/lm"
    corpus: list[str] = field(default_factory=list)  # empty: the default Shakespeare corpus
    name: str | None = None  # artifact name; default "<corpus>-<cell>"
    resume: bool = False
    resume_from: str = "last"  # last: checkpoint.pt | best: best.pt
    overwrite: bool = False
    seed: int = 1337
    max_minutes: float | None = None  # training time; validation pauses the clock
    max_steps: int | None = None
    threads: int | None = None
    device: str = "auto"  # auto: cuda when available
    # model
    cell: str = "lstm"
    embed_dim: int = 64
    hidden_size: int | None = None
    num_layers: int | None = None
    dropout: float | None = None
    embed_dropout: float | None = None
    # optimisation
    batch_size: int | None = None  # per process
    bptt: int | None = None
    state: str = "carry"  # carry: contiguous streams, state kept | reset: random windows
    lr: float | None = None
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float | None = None
    grad_clip: float = 1.0  # 0: off
    precision: str = "auto"  # autocast dtype of the training steps; weights stay float32
    # validation
    val_fraction: float = 0.1
    eval_every: int | None = None  # steps
    eval_chars: int = 1_000_000  # periodic validation reads at most this much; the last, all
    patience: int = 0  # stop after this many validations without a new best (0: never)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.state not in ("carry", "reset"):
            raise TrainingError(f"--state must be carry or reset, got {self.state!r}")
        if self.precision not in PRECISIONS:
            raise TrainingError(f"--precision must be one of {', '.join(PRECISIONS)}")
        if self.device not in DEVICES:
            raise TrainingError(f"--device must be one of {', '.join(DEVICES)}")
        if self.resume_from not in ("last", "best"):
            raise TrainingError(f"--resume takes last or best, got {self.resume_from!r}")
        if not str(self.out).strip():
            raise TrainingError("--out is empty: name the run folder")
        if any(not str(p).strip() for p in self.corpus):
            raise TrainingError("corpus path is empty")
        if self.name is not None and name_problem(self.name, "--name"):
            raise TrainingError(str(name_problem(self.name, "--name")))
        for key in ("batch_size", "bptt", "eval_every", "embed_dim", "hidden_size",
                    "num_layers"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise TrainingError(f"--{key.replace('_', '-')} must be >= 1, got {value}")
        if self.eval_chars < 2:  # the first character is only read, so one scores nothing
            raise TrainingError(f"--eval-chars must be >= 2 (each character after the first "
                                f"is scored), got {self.eval_chars}")
        for key in ("embed_dim", "hidden_size", "batch_size"):
            value = getattr(self, key)
            if value is not None and value > MAX_WIDTH:
                raise TrainingError(f"--{key.replace('_', '-')} must be <= {MAX_WIDTH} (2**31 "
                                    f"- 1), got {value}")
        if self.num_layers is not None and self.num_layers > MAX_LAYERS:
            raise TrainingError(f"--num-layers must be <= {MAX_LAYERS}, got {self.num_layers}")
        for key in ("dropout", "embed_dropout"):
            value = getattr(self, key)
            if value is not None and not 0.0 <= value < 1.0:
                raise TrainingError(f"--{key.replace('_', '-')} must be in [0, 1), got {value}")
        for key in ("lr", "weight_decay", "min_lr_ratio", "grad_clip", "warmup_steps",
                    "patience", "seed"):
            value = getattr(self, key)
            if value is not None and not (0 <= value < math.inf):  # also refuses nan
                raise TrainingError(f"--{key.replace('_', '-')} must be >= 0 and finite, "
                                    f"got {value}")
        if self.lr is not None and self.lr == 0:
            raise TrainingError("--lr must be > 0")
        if self.min_lr_ratio is not None and self.min_lr_ratio > 1:  # the decay would climb
            raise TrainingError(f"--min-lr-ratio must be in [0, 1] (the schedule's end as a "
                                f"fraction of --lr), got {self.min_lr_ratio}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise TrainingError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_minutes is not None and not 0 < self.max_minutes < math.inf:
            raise TrainingError(f"--max-minutes must be > 0 and finite, got {self.max_minutes}")
        if self.max_steps is not None and self.max_steps < 1:
            raise TrainingError("--max-steps must be >= 1")
        if self.threads is not None and not 1 <= self.threads <= MAX_THREADS:
            raise TrainingError(f"--threads must be in 1..{MAX_THREADS}, got {self.threads}")
        if self.seed >= 2**63:
            raise TrainingError(f"--seed must be < 2**63, got {self.seed}")
        if self.max_minutes is None and self.max_steps is None:
            self.max_minutes = 5.0


# --- distributed ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # where the collectives' tensors live

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def any(self, *flags: bool) -> list[bool]:
        """Each flag, true when it is true on any rank: every rank then takes the same turn."""
        if self.world == 1:
            return list(flags)
        t = torch.tensor([float(f) for f in flags], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [v > 0 for v in t.tolist()]

    def max(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())


def init_distributed(requested_device: str) -> tuple[Dist, torch.device]:
    """DDP when started by torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPU; else one
    process. Returns the process group and this process's training device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device, local_rank)
    if world <= 1:
        return Dist(device=device), device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    # float64 collectives: NCCL needs them on the GPU, gloo on the CPU.
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device), device


class _TrainStep(nn.Module):
    """DDP wraps `forward`; training runs CharRNN.forward_train, so route it through here."""

    def __init__(self, model: CharRNN) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward_train(ids, state)


# --- pieces --------------------------------------------------------------------------------


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warmup over warmup_steps, then cosine from lr to min_lr_ratio * lr as the step or
    time budget (whichever is further along) runs out."""
    assert cfg.lr is not None  # resolved before training starts
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


@torch.no_grad()
def evaluate(model: CharRNN, ids: torch.Tensor, streams: int = 32, bptt: int = 256) -> float:
    """Mean nats per predicted character over ids, state carried through each stream, float32,
    on the model's device."""
    was_training = model.training
    model.eval()
    device = model.head.weight.device
    total, count, state = 0.0, 0, None
    for x, y in data.eval_windows(ids, streams, bptt):
        x, y = x.to(device), y.to(device)
        logits, state = model.forward_train(x, state)  # (B, T, V)
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    if count == 0:
        return float("nan")
    return total / count


def _corpus(cfg: TrainConfig, d: Dist) -> tuple[str, list[data.Document]]:
    if cfg.corpus:  # a run folder inside the corpus folder is not text to learn
        return "corpus", data.read_corpus(cfg.corpus, skip=[Path(cfg.out)])
    # Rank 0 fetches and caches; the others then read the cache.
    docs = data.load_default_corpus() if d.main else None
    d.barrier()
    return data.SHAKESPEARE.name, docs if docs is not None else data.load_default_corpus()


# What a resumed run takes from the command line; everything else comes from its checkpoint.
_RESUME_OVERRIDES = ("out", "corpus", "resume", "resume_from", "overwrite", "max_minutes",
                     "max_steps", "threads", "device", "eval_every", "eval_chars", "patience",
                     "progress")
# Taken from the command line when given (not auto), else from the checkpoint: the precision a
# run trained in may not exist on the device it resumes on (fp16 on a CPU).
_RESUME_GIVEN = ("precision",)


def _resumed_config(cfg: TrainConfig, ckpt: dict[str, Any], path: Path) -> TrainConfig:
    saved = ckpt.get("train_config")
    if not isinstance(saved, dict) or "preset" in saved:
        raise CheckpointError(f"{path} is not a language-model run; cannot resume it")
    known = {f.name for f in fields(TrainConfig)}
    merged = {k: v for k, v in saved.items() if k in known}
    if "precision" not in saved and "bf16" in saved:  # checkpoints from before --precision
        merged["precision"] = "bf16" if saved["bf16"] else "fp32"
    merged.update({k: getattr(cfg, k) for k in _RESUME_OVERRIDES})
    merged.update({k: getattr(cfg, k) for k in _RESUME_GIVEN
                   if getattr(cfg, k) != TrainConfig.__dataclass_fields__[k].default})
    if merged.get("eval_every") is None:
        merged["eval_every"] = saved.get("eval_every")
    if cfg.name:
        merged["name"] = cfg.name
    try:
        return TrainConfig(**merged)
    except (TypeError, TrainingError) as e:
        raise CheckpointError(f"{path} holds an unusable training config: {e}") from None


def ignored_on_resume(cfg: TrainConfig, resumed: TrainConfig) -> list[str]:
    """The options given on the command line (not left at their default) that the resumed run
    does not take, because the checkpoint's values win: `--cell gru (the run's: lstm)`."""
    ignored = []
    for f in fields(TrainConfig):
        if f.name in _RESUME_OVERRIDES or f.name == "name":
            continue
        given, kept = getattr(cfg, f.name), getattr(resumed, f.name)
        if given != f.default and given != kept:
            ignored.append(f"--{f.name.replace('_', '-')} {given} (the run's: {kept})")
    return ignored


def _corpus_words(train_config: Any) -> str:
    """How a checkpoint's corpus was given: `--corpus a.txt notes` or `the default corpus`."""
    paths = train_config.get("corpus") if isinstance(train_config, dict) else None
    return f"--corpus {' '.join(map(str, paths))}" if paths else "the default corpus"


def _check_resumed_corpus(cfg: TrainConfig, resumed: dict[str, Any], path: Path) -> None:
    """Before any corpus is read: a run trained on its own files resumes only with --corpus
    (else the default corpus would be fetched and read, only to be refused)."""
    saved = resumed.get("train_config") or {}
    if saved.get("corpus") and not cfg.corpus:
        raise CheckpointError(f"{path} was trained on {_corpus_words(saved)}: pass the same "
                              "--corpus to resume it")


def _resolve_sizes(cfg: TrainConfig, train_chars: int, world: int) -> list[str]:
    """Fills the auto size fields in place from the corpus size; returns the names filled."""
    sizes = autoconfig.choose_sizes(train_chars)
    # A short text gets shorter windows (choose_bptt), so that it trains at all.
    streams = (cfg.batch_size or 1) * world
    sizes = replace(sizes, bptt=autoconfig.choose_bptt(train_chars, streams))
    filled = []
    for key in ("hidden_size", "num_layers", "lr", "bptt", "eval_every"):
        if getattr(cfg, key) is None:
            setattr(cfg, key, getattr(sizes, key))
            filled.append(key)
    if cfg.batch_size is None:
        cfg.batch_size = autoconfig.choose_batch_size(train_chars, cfg.bptt, world)
        filled.append("batch_size")
    return filled


def _summary(metrics: dict[str, Any]) -> str:
    return (f"{metrics['steps']} steps, {metrics['train_time_s']:.0f} s: val "
            f"{metrics['val_nats_per_char']:.4f} nats/char "
            f"({metrics['val_bits_per_char']:.4f} bits/char)")


def _cpu(value: Any) -> Any:
    """A copy with every tensor on the CPU: checkpoints do not depend on the training device."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu(v) for v in value)
    return value


def _batches(cfg: TrainConfig, train_ids: torch.Tensor, val_chars: int, d: Dist,
             auto: list[str]) -> data.StreamBatches | data.RandomWindows:
    """The training batches; a text too short for them is one line that says what to change
    (only the sizes given on the command line can be lowered: auto already went as low as it
    goes)."""
    carry = cfg.state == "carry"
    sizes = ("batch_size", "bptt") if carry else ("bptt",)
    given = [f"--{k.replace('_', '-')}" for k in sizes if k not in auto]
    if not given:
        need = autoconfig.min_train_chars(d.world) if carry else autoconfig.MIN_BPTT + 2
        if len(train_ids) < need:
            raise CorpusError(
                f"the training text is too short ({len(train_ids)} chars): a run needs at least "
                f"{need}; add text" + (" or lower --val-fraction" if val_chars else ""))
    hint = (f"lower {' or '.join(given)} (or leave {'both' if len(given) > 1 else 'it'} on "
            "auto)" if given else "add text")
    batches_cls = data.StreamBatches if carry else data.RandomWindows
    return batches_cls(train_ids, cfg.batch_size, cfg.bptt, cfg.seed, d.rank, d.world,
                       hint=hint)


class LogProgress:
    """Progress where stderr is not a terminal (a log file, a container): a plain line every
    interval_s, since a bar redrawn with \\r there is one line that only grows."""

    def __init__(self, total: int | None, initial: int, interval_s: float = 30.0) -> None:
        self.total, self.n, self.interval_s = total, initial, interval_s
        self.postfix: dict[str, Any] = {}
        self.last = time.monotonic()

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        self.postfix = values

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.interval_s:
            self.last = time.monotonic()
            of = f"/{self.total}" if self.total else ""
            values = ", ".join(f"{k} {v}" for k, v in self.postfix.items())
            print(f"step {self.n}{of}" + (f": {values}" if values else ""), file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        pass


def progress_bar(total: int | None, initial: int, enabled: bool) -> tqdm | LogProgress:
    """On a terminal a live bar; in a log (stderr not a terminal) a line per ~30 s, as
    `nextchar batch` does, instead of a redraw per step."""
    if enabled and not sys.stderr.isatty():
        return LogProgress(total, initial)
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                disable=not enabled, file=sys.stderr, mininterval=0.5)


class StopSignals:
    """While training, SIGINT (Ctrl-C) and SIGTERM (what `docker stop` and Kubernetes send)
    ask the loop to stop after the current step and save, instead of ending the process with
    every step since the last validation lost. A second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(sig)
            if previous is signal.SIG_IGN:  # started ignoring it (nohup, `cmd &`): keep so
                continue
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (a library caller): not ours to set
                break
            self.previous[sig] = previous
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self.previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)


# --- the loop ------------------------------------------------------------------------------


def train(cfg: TrainConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Trains (or resumes) a language model; returns its final metrics, with `best` (step and
    validation loss of the best checkpoint, best.pt)."""
    d, device = init_distributed(cfg.device)
    try:
        result = _train(cfg, d, device, log)
        # Every rank tears its process group down together: a rank that tore down while rank 0
        # was still writing the run's files died in gloo with SIGABRT ("terminate called
        # without an active exception"), about one run in eight here.
        d.barrier()
        return result
    finally:
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, d: Dist, device: torch.device,
           log: Callable[[str], None] | None) -> dict[str, Any]:
    say = (log or tqdm.write) if d.main else (lambda _msg: None)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif d.world > 1 and device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // d.world))
    out = Path(cfg.out)
    ckpt_path, best_path = out / FILENAME, out / BEST_FILENAME
    if d.main:
        check_out_folder(out, cfg.resume, cfg.overwrite)

    resume_path = best_path if cfg.resume_from == "best" else ckpt_path
    resumed = load_checkpoint(resume_path) if cfg.resume else None
    if resumed:
        given, cfg = cfg, _resumed_config(cfg, resumed, resume_path)
        ignored = ignored_on_resume(given, cfg)
        if ignored:
            say(f"warning: --resume continues the run as it was trained; ignoring "
                f"{', '.join(ignored)}")
        try:
            resolve_precision(cfg.precision, device)
        except TrainingError:
            if given.precision != "auto":
                raise
            # A GPU run's fp16 on a CPU: what auto picks there instead, as a new run would.
            say(f"warning: the run trained with --precision {cfg.precision}, which "
                f"{device.type} here lacks: resuming with --precision auto")
            cfg.precision = "auto"
        _check_resumed_corpus(cfg, resumed, resume_path)
    else:
        cfg = replace(cfg)  # the auto fields are filled in below; the caller's stays as given
    corpus_name, docs = _corpus(cfg, d)
    split = data.split_corpus(docs, cfg.val_fraction)
    vocab = resumed["vocab"] if resumed else data.build_vocab(split.train)
    train_ids, train_dropped = data.encode(split.train, vocab)
    val_ids, val_dropped = data.encode(split.val, vocab)
    corpus_info = {
        "name": corpus_name,
        "documents": len(docs),
        "sha256": data.corpus_fingerprint(docs),
        "train_chars": len(train_ids),
        "val_chars": len(val_ids),
        "val_fraction": cfg.val_fraction,
        "val_chars_dropped": sum(val_dropped.values()),
        "val_dropped": dict(val_dropped.most_common(20)),
    }
    # A checkpoint's "corpus" may be null or not a dict (a hand-edited file): no record of the
    # corpus, which no corpus matches.
    saved_corpus = (resumed or {}).get("corpus")
    saved_corpus = saved_corpus if isinstance(saved_corpus, dict) else {}
    if resumed and saved_corpus.get("sha256") != corpus_info["sha256"]:
        raise CheckpointError(f"{resume_path} was trained on a different corpus "
                              f"({_corpus_words(resumed.get('train_config'))}); cannot resume")
    if train_dropped:  # the vocabulary of a resumed run may miss characters of new text
        raise CheckpointError("the corpus has characters outside the run's vocabulary")
    saved_chars = saved_corpus.get("train_chars", len(train_ids))
    if saved_chars != len(train_ids):  # one-line documents were all training text before
        raise CheckpointError(f"{resume_path} was trained on {saved_chars} characters of this "
                              f"corpus and this nextchar splits it into {len(train_ids)} for "
                              "training: start a new run (--overwrite)")
    has_val = len(val_ids) >= 2
    if not has_val:
        _no_validation(cfg, say)

    auto = list((resumed or {}).get("auto", {}).get("fields", [])) if resumed else []
    auto += _resolve_sizes(cfg, len(train_ids), d.world)
    # Before the model is built: a text too short for the batches ends the run here.
    batches = _batches(cfg, train_ids, len(val_ids), d, auto)
    amp_dtype = resolve_precision(cfg.precision, device)
    chars_per_step = cfg.batch_size * cfg.bptt * d.world
    default_rate = (autoconfig.CUDA_CHARS_PER_S if device.type == "cuda"
                    else autoconfig.CPU_CHARS_PER_S)
    auto_reg = [k for k in ("dropout", "embed_dropout", "weight_decay") if getattr(cfg, k) is None]

    def settle_regularization(chars_per_s: float) -> float:
        """Fills (or refills) the auto dropout and weight decay for the epochs the budget
        allows at this speed; returns that number of epochs."""
        epochs = autoconfig.planned_epochs(len(train_ids), chars_per_step, cfg.max_steps,
                                           cfg.max_minutes, chars_per_s)
        reg = autoconfig.choose_regularization(epochs)
        for key in auto_reg:
            setattr(cfg, key, getattr(reg, key))
        return epochs

    epochs_planned = settle_regularization(default_rate)
    auto += [k for k in auto_reg if k not in auto]

    torch.manual_seed(cfg.seed)
    if resumed:
        model = model_from_checkpoint(resumed, resume_path).train()
        model.set_dropout(cfg.dropout or 0.0, cfg.embed_dropout or 0.0)
    else:
        mcfg = CharRNNConfig(len(vocab), cfg.embed_dim, cfg.hidden_size, cfg.num_layers,
                             cfg.cell, cfg.dropout or 0.0, cfg.embed_dropout or 0.0)
        try:
            model = CharRNN(mcfg).train()
        except (MemoryError, RuntimeError) as e:
            if not _out_of_memory(e):
                raise
            raise TrainingError(
                f"the model does not fit in memory (--hidden-size {cfg.hidden_size}, "
                f"--num-layers {cfg.num_layers}, --embed-dim {cfg.embed_dim}): choose a "
                f"smaller one") from None
    model.to(device)
    mcfg = model.config
    params = sum(p.numel() for p in model.parameters())
    runner: nn.Module = _TrainStep(model)
    if d.world > 1:
        runner = nn.parallel.DistributedDataParallel(
            runner, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # fp16 needs loss scaling (its range cannot hold small gradients); bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    step, train_time_s, chars_seen = 0, 0.0, 0
    saved_step: int | None = None  # the step checkpoint.pt holds (for a diverged run's line)
    history: dict[str, Any] = {"train": {"step": [], "time_s": [], "nats": []},
                               "val": {"step": [], "time_s": [], "nats": []}}
    best: dict[str, Any] = {"step": None, "val_nats_per_char": math.inf, "file": BEST_FILENAME}
    evals_since_best = 0
    if resumed:
        try:
            optimizer.load_state_dict(resumed["optimizer_state"])
            batches.load_state_dict(resumed["data_state"])
            step, train_time_s = int(resumed["step"]), float(resumed["train_time_s"])
            chars_seen, history = int(resumed["chars_seen"]), resumed["history"]
            if resumed.get("best"):
                best = dict(resumed["best"])
                saved_val = best["val_nats_per_char"]  # None: not finite (no validation text)
                best["val_nats_per_char"] = math.inf if saved_val is None else float(saved_val)
            evals_since_best = int(resumed.get("evals_since_best", 0))
            saved_step = step if resume_path == ckpt_path else None
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{resume_path} cannot be resumed: {e}") from None
        so_far = (f"best so far step {best['step']}, val {best['val_nats_per_char']:.4f}"
                  if best["step"] is not None else "no validation yet")
        say(f"resuming {resume_path} at step {step} ({train_time_s:.0f} s trained; {so_far})")
    for group in optimizer.param_groups:  # auto weight decay may differ from the saved one
        group["weight_decay"] = cfg.weight_decay

    name = cfg.name or (resumed or {}).get("name") or f"{corpus_name}-{mcfg.cell}"
    say(f"{name}: {mcfg.cell} {mcfg.num_layers}x{mcfg.hidden_size} embed {mcfg.embed_dim}, "
        f"{params:,} params, vocab {len(vocab)}; train {len(train_ids):,} chars, val "
        f"{len(val_ids):,} (dropped {corpus_info['val_chars_dropped']}); batch "
        f"{cfg.batch_size}x{cfg.bptt} x {d.world} proc on {device}, "
        f"{precision_name(amp_dtype)}, {torch.get_num_threads()} threads; lr {cfg.lr:g}, "
        f"dropout {cfg.dropout:g}/{cfg.embed_dropout:g} (output/embedding), weight decay "
        f"{cfg.weight_decay:g}; ~{epochs_planned:.1f} epochs planned"
        + (f" (auto: {', '.join(auto)})" if auto else ""))

    def progress_of(step: int, train_time_s: float) -> float:
        by_steps = step / cfg.max_steps if cfg.max_steps else 0.0
        by_time = train_time_s / (cfg.max_minutes * 60) if cfg.max_minutes else 0.0
        return max(by_steps, by_time)

    def payload(metrics: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": name,
            "model_config": mcfg.to_dict(),
            "vocab": list(vocab),
            "unk_id": None,
            "model_state": _cpu(model.state_dict()),
            "optimizer_state": _cpu(optimizer.state_dict()),
            "data_state": batches.state_dict(),
            "train_config": asdict(cfg),
            "auto": {"fields": auto, "planned_epochs": round(epochs_planned, 2)},
            "step": step,
            "train_time_s": train_time_s,
            "chars_seen": chars_seen,
            "metrics": metrics,
            "best": {**best, "val_nats_per_char": _finite(best["val_nats_per_char"])},
            "evals_since_best": evals_since_best,
            "history": history,
            "corpus": corpus_info,
            "versions": {"torch": torch.__version__},
        }

    def checkpoint(metrics: dict[str, Any], improved: bool, validated: bool = True) -> None:
        """checkpoint.pt is the last state (for --resume); best.pt the lowest validation
        loss so far (what `nextchar export` ships). Both are complete checkpoints. A state
        saved without a validation (on a signal) never becomes best.pt by default."""
        nonlocal saved_step
        if not d.main:
            return
        body = payload(metrics)
        save_checkpoint(ckpt_path, body)
        if improved or (validated and not best_path.exists()):
            save_checkpoint(best_path, body)
        saved_step = step
        # JSON has no nan: a loss that is not a number (no validation text) is null.
        text = json.dumps(finite_or_none({**metrics, "best": body["best"]}), indent=1,
                          allow_nan=False)
        try:
            (out / METRICS_FILENAME).write_text(text + "\n")
        except OSError as e:  # a failed write names no file (the open did)
            raise OSError(e.errno, e.strerror, str(out / METRICS_FILENAME)) from e
        from .curves import save_run_curve  # matplotlib: only the process that writes needs it

        save_run_curve(history, out / CURVE_FILENAME, f"{name}: {_summary(metrics)}",
                       best_step=best["step"])

    def run_metrics(nats: float, chars: int, final: bool) -> dict[str, Any]:
        train_nats = history["train"]["nats"][-1] if history["train"]["nats"] else float("nan")
        return {
            "val_nats_per_char": nats, "val_bits_per_char": nats / LN2,
            "val_chars_evaluated": chars, "val_full": final or chars == len(val_ids),
            "train_nats_per_char": train_nats, "train_bits_per_char": train_nats / LN2,
            "steps": step, "train_time_s": round(train_time_s, 2), "chars_seen": chars_seen,
            "params": params, "world_size": d.world, "corpus": corpus_info["name"],
            "corpus_sha256": corpus_info["sha256"],
            "val_chars_dropped": corpus_info["val_chars_dropped"],
            "device": device.type, "precision": precision_name(amp_dtype),
        }

    def diverged(what: str, value: float, at: int | None = None) -> TrainingError:
        kept = f"; {ckpt_path} keeps step {saved_step}" if saved_step is not None else ""
        clip = " or leave --grad-clip on" if cfg.grad_clip == 0 else ""
        return TrainingError(f"{what} became {value} at step {step if at is None else at} "
                             f"(training diverged); lower --lr{clip}{kept}")

    def validate(final: bool) -> tuple[dict[str, Any], bool]:
        """Scores the model; returns its metrics and whether it is a new best."""
        nonlocal evals_since_best
        ids = val_ids if final else val_ids[: cfg.eval_chars]
        nats = evaluate(model, ids) if d.main else float("nan")
        d.barrier()
        if d.any(d.main and has_val and not math.isfinite(nats))[0]:
            raise diverged("validation loss", nats)
        history["val"]["step"].append(step)
        history["val"]["time_s"].append(train_time_s)
        history["val"]["nats"].append(nats)
        # Without validation text (nats is nan) every checkpoint is the best so far, so that
        # best.pt is the last one, what export then ships.
        improved = not has_val or nats < best["val_nats_per_char"]
        if improved:
            best.update(step=step, val_nats_per_char=nats, train_time_s=round(train_time_s, 2))
            evals_since_best = 0
        else:
            evals_since_best += 1
        return run_metrics(nats, len(ids), final), improved

    def save_and_stop(signum: int) -> Interrupted:
        """On SIGINT or SIGTERM: the state after this step to checkpoint.pt (not validated, so
        best.pt stays, unless without validation text best.pt is the last state anyway)."""
        metrics = {**run_metrics(float("nan"), 0, False), "interrupted": True}
        checkpoint(metrics, improved=not has_val, validated=False)
        what = signal.Signals(signum).name
        return Interrupted(f"{what}: stopped at step {step}, saved {ckpt_path}; continue with "
                           "--resume", 128 + signum)

    try:  # before the run folder is made: a refused run leaves none
        state = model.initial_state(cfg.batch_size)
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        raise TrainingError(f"the batch's recurrent state does not fit in memory (--batch-size "
                            f"{cfg.batch_size}, --hidden-size {cfg.hidden_size}): choose a "
                            "smaller --batch-size") from None
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.overwrite and not resumed:
            gone = clear_run(out)
            if gone:
                say(f"--overwrite: deleted the earlier run's {', '.join(gone)} in {out}")
    bar = progress_bar(cfg.max_steps, step, d.main and cfg.progress)
    window_loss, window_n = 0.0, 0
    progress = progress_of(step, train_time_s)
    start_step, start_time_s, stopped_early = step, train_time_s, False
    with StopSignals() as signals:
        while progress < 1.0:
            t0 = time.perf_counter()
            lr = lr_at(cfg, step, progress)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y, fresh = batches.next()  # (B, T) each
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if fresh or cfg.state == "reset":
                state = model.initial_state(cfg.batch_size)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                logits, state = runner(x, state)  # (B, T, V), (S, B, H)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            try:
                scaler.step(optimizer)
            except RuntimeError as e:  # AdamW's step takes lr (and lr * decay) as float32
                if "overflow" not in str(e):
                    raise
                bar.close()
                raise diverged("the weight update", math.inf, at=step + 1) from None
            scaler.update()
            state = state.detach().float()
            loss_value = loss.item()  # also waits for the GPU, so the step time below is real
            step += 1
            chars_seen += x.numel() * d.world
            train_time_s = d.max(train_time_s + time.perf_counter() - t0)
            progress = progress_of(step, train_time_s)
            # One collective for both, so that every rank stops at the same step.
            bad_loss, stop = d.any(not math.isfinite(loss_value), signals.signum is not None)
            if bad_loss:  # the weights are now past saving: the files keep the last good state
                bar.close()
                raise diverged("loss", loss_value)
            if (auto_reg and cfg.max_minutes and not resumed
                    and step == start_step + autoconfig.CALIBRATION_STEPS):
                # The first estimate of the epochs used a nominal speed; now the run knows its
                # own (on this machine, under this load), so settle dropout and decay for it.
                rate = (step - start_step) * chars_per_step / max(1e-9,
                                                                  train_time_s - start_time_s)
                epochs_planned = settle_regularization(rate)
                model.set_dropout(cfg.dropout, cfg.embed_dropout)
                for group in optimizer.param_groups:
                    group["weight_decay"] = cfg.weight_decay
                say(f"step {step}: {rate / 1000:.1f} k chars/s -> ~{epochs_planned:.1f} "
                    f"epochs: dropout {cfg.dropout:g}/{cfg.embed_dropout:g}, weight decay "
                    f"{cfg.weight_decay:g}")

            window_loss, window_n = window_loss + loss_value, window_n + 1
            # Also at each validation step: its line and metrics report the training loss of the
            # steps just before it (a step between tens found no point yet, or an old one).
            if step % 10 == 0 or step % cfg.eval_every == 0 or progress >= 1.0 or stop:
                nats = window_loss / window_n
                history["train"]["step"].append(step)
                history["train"]["time_s"].append(round(train_time_s, 3))
                history["train"]["nats"].append(nats)
                window_loss, window_n = 0.0, 0
                bar.set_postfix(loss=f"{nats:.3f}", bpc=f"{nats / LN2:.3f}", lr=f"{lr:.1e}",
                                min=f"{train_time_s / 60:.1f}", refresh=False)
            bar.update(1)
            if stop:
                bar.close()
                raise save_and_stop(signals.signum or signal.SIGTERM)
            if step % cfg.eval_every == 0 and progress < 1.0:
                metrics, improved = validate(final=False)
                say(f"step {step}: val {metrics['val_nats_per_char']:.4f} nats/char "
                    f"({metrics['val_bits_per_char']:.4f} bits/char), train "
                    f"{metrics['train_nats_per_char']:.4f}, {train_time_s:.0f} s"
                    + (" (best)" if improved else f" (best {best['val_nats_per_char']:.4f} at "
                       f"step {best['step']})"))
                checkpoint(metrics, improved)
                if cfg.patience and d.max(float(evals_since_best >= cfg.patience)) > 0:
                    stopped_early = True
                    say(f"early stop: {evals_since_best} validations without a new best "
                        f"(--patience {cfg.patience})")
                    break
        bar.close()
        # A signal from here on changes nothing: the final validation and save finish anyway.
        metrics, improved = validate(final=True)
        metrics["stopped_early"] = stopped_early
        checkpoint(metrics, improved)
    say(f"done: {_summary(metrics)}; checkpoint {ckpt_path}; best {best_path}: step "
        f"{best['step']}, val {best['val_nats_per_char']:.4f} nats/char")
    return {**metrics, "best": {**best, "val_nats_per_char": _finite(best["val_nats_per_char"])}}


def _no_validation(cfg: TrainConfig, say: Callable[[str], None]) -> None:
    """Without validation text nothing can rank checkpoints: best.pt follows the last one, and
    --patience, which counts validations without a new best, has nothing to count."""
    why = ("--val-fraction 0" if cfg.val_fraction == 0 else
           f"--val-fraction {cfg.val_fraction:g} holds out no whole line of this corpus")
    if cfg.patience:
        raise TrainingError(f"--patience needs validation text, and there is none ({why}): "
                            "drop --patience, or add text")
    say(f"warning: no validation text ({why}): val loss is reported as nan, and best.pt is "
        "always the last checkpoint")


def _out_of_memory(e: BaseException) -> bool:
    """Whether e is an allocation that failed: torch's allocator raises a RuntimeError, or one
    whose size overflows, instead of MemoryError."""
    return isinstance(e, MemoryError) or "alloc" in str(e) or "overflow" in str(e)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


# --- the seed's task -----------------------------------------------------------------------


def train_hello(out_dir: str | Path = "runs/hello", quiet: bool = False,
                overwrite: bool = False, name: str | None = None) -> dict[str, Any]:
    """Trains the seed's three models on hello -> ohlol and saves the embedding model as a run
    checkpoint in out_dir (vocab e h l o, cell rnn), ready for `export`. A folder that holds
    anything but an earlier hello run is refused, as for a language model, unless `overwrite`
    (which first deletes an earlier run's files there: its best.pt would otherwise be what
    export ships). An earlier hello run is replaced: the fixed seeds give the same model.
    `name` is the artifact's name (default hello-rnn).

    Returns {"models": {key: {"predicted", "loss", "epochs", "seed", "title"}},
             "all_ohlol": bool, "checkpoint": str}.
    """
    out = Path(out_dir)
    if not str(out_dir).strip():
        raise TrainingError("--out is empty: name the run folder")
    if name is not None and name_problem(name, "--name"):
        raise TrainingError(str(name_problem(name, "--name")))
    overwrite = overwrite or holds_only_a_hello_run(out)
    check_out_folder(out, resume=False, overwrite=overwrite, resumable=False)
    log = None if quiet else print
    models: dict[str, Any] = {}
    losses: dict[str, list[float]] = {}
    trained = None
    for plan in hello.PLANS:
        if log:
            log(f"== {plan.title}: {plan.epochs} epochs, Adam lr {hello.LEARNING_RATE}, "
                f"torch seed {plan.seed}")
        trained, result = hello.train_one(plan, log)
        losses[plan.key] = result.pop("losses")
        models[plan.key] = {**result, "title": plan.title}
    assert isinstance(trained, CharRNN)  # the last plan is the embedding model

    embedding = models["embedding_rnn"]
    if overwrite:
        gone = clear_run(out)
        if log and gone:
            log(f"--overwrite: deleted the earlier run's {', '.join(gone)} in {out}")
    path = save_checkpoint(out / FILENAME, {
        "name": name or "hello-rnn",
        "model_config": trained.config.to_dict(),
        "vocab": list(hello.VOCAB),
        "unk_id": None,
        "model_state": {k: v.detach().clone() for k, v in trained.state_dict().items()},
        "optimizer_state": None,
        "data_state": None,
        "train_config": {"preset": "hello", "epochs": embedding["epochs"],
                         "seed": embedding["seed"], "lr": hello.LEARNING_RATE},
        "step": embedding["epochs"],
        "train_time_s": 0.0,
        "chars_seen": 5 * embedding["epochs"],
        "metrics": {"preset": "hello", "source": hello.SOURCE, "target": hello.TARGET,
                    "predicted": embedding["predicted"], "train_nats_per_char": embedding["loss"],
                    "train_bits_per_char": embedding["loss"] / LN2, "steps": embedding["epochs"]},
        "history": {"hello_losses": losses},
        "corpus": {"name": "hello", "text": hello.SOURCE},
        "versions": {"torch": torch.__version__},
    })
    from .curves import save_hello_curve

    save_hello_curve(losses, out / CURVE_FILENAME)
    all_ohlol = all(m["predicted"] == hello.TARGET for m in models.values())
    if log:
        log("")
        for _key, m in models.items():
            log(f"{m['title']}: predicts {m['predicted']!r} after {m['epochs']} epochs "
                f"(seed {m['seed']}), loss {m['loss']:.4f}")
        verdict = ("all three seed models predict 'ohlol' (fixed seeds: the same every run)"
                   if all_ohlol else "NOT all seed models reached 'ohlol'")
        log(f"{verdict}; checkpoint {path}")
    return {"models": models, "all_ohlol": all_ohlol, "checkpoint": str(path)}
