"""The training loop: the hello preset and character-level language modelling.

    python -m nextchar.training.cli train --preset hello                 # the seed's task
    python -m nextchar.training.cli train --max-minutes 2 --out runs/lm  # Shakespeare
    python -m nextchar.training.cli train --corpus my_texts/ --out runs/mine
    torchrun --standalone --nproc_per_node 2 -m nextchar.training.cli train --out runs/ddp

Truncated BPTT with the state carried between windows (each batch row continues the row
before it), AdamW with linear warmup and cosine decay to `min_lr_ratio * lr` over the step or
time budget, optional bf16 autocast, gradient clipping, periodic validation in nats and bits per
character, a checkpoint after every validation, a loss-curve PNG. Under torchrun, DDP over gloo:
every rank trains on its own streams and only rank 0 validates and writes.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import data, hello
from .checkpoint import FILENAME, load_checkpoint, model_from_checkpoint, save_checkpoint
from .errors import CheckpointError, TrainingError
from .model import CharRNN, CharRNNConfig

LN2 = math.log(2)


@dataclass
class TrainConfig:
    """Everything a language-model run depends on; saved in its checkpoint."""

    out: str = "runs/lm"
    corpus: list[str] = field(default_factory=list)  # empty: the default Shakespeare corpus
    name: str | None = None  # artifact name; default "<corpus>-<cell>"
    resume: bool = False
    overwrite: bool = False
    seed: int = 1337
    max_minutes: float | None = None  # training time; validation pauses the clock
    max_steps: int | None = None
    threads: int | None = None
    # model
    cell: str = "lstm"
    embed_dim: int = 64
    hidden_size: int = 512
    num_layers: int = 1
    dropout: float = 0.0
    # optimisation
    batch_size: int = 128  # per process
    bptt: int = 64
    state: str = "carry"  # carry: contiguous streams, state kept | reset: random windows
    lr: float = 8e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # 0: off
    bf16: bool = True  # bf16 autocast for the training steps; weights stay float32
    # validation
    val_fraction: float = 0.1
    eval_every: int = 250  # steps
    eval_chars: int = 1_000_000  # periodic validation reads at most this much; the last, all
    progress: bool = True

    def __post_init__(self) -> None:
        if self.state not in ("carry", "reset"):
            raise TrainingError(f"--state must be carry or reset, got {self.state!r}")
        for key in ("batch_size", "bptt", "eval_every"):
            if getattr(self, key) < 1:
                raise TrainingError(f"--{key.replace('_', '-')} must be >= 1")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise TrainingError("--max-minutes must be > 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise TrainingError("--max-steps must be >= 1")
        if self.max_minutes is None and self.max_steps is None:
            self.max_minutes = 5.0


# --- distributed ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def max(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())


def init_distributed() -> Dist:
    """DDP over gloo when started by torchrun (WORLD_SIZE > 1), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


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
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


@torch.no_grad()
def evaluate(model: CharRNN, ids: torch.Tensor, streams: int = 32, bptt: int = 256) -> float:
    """Mean nats per predicted character over ids, state carried through each stream, float32."""
    was_training = model.training
    model.eval()
    total, count, state = 0.0, 0, None
    for x, y in data.eval_windows(ids, streams, bptt):
        logits, state = model.forward_train(x, state)  # (B, T, V)
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    if count == 0:
        return float("nan")
    return total / count


def _corpus(cfg: TrainConfig, d: Dist) -> tuple[str, list[data.Document]]:
    if cfg.corpus:
        return "corpus", data.read_corpus(cfg.corpus)
    # Rank 0 fetches and caches; the others then read the cache.
    docs = data.load_default_corpus() if d.main else None
    d.barrier()
    return data.SHAKESPEARE.name, docs if docs is not None else data.load_default_corpus()


# What a resumed run takes from the command line; everything else comes from its checkpoint.
_RESUME_OVERRIDES = ("out", "corpus", "resume", "overwrite", "max_minutes", "max_steps",
                     "threads", "eval_every", "eval_chars", "progress")


def _resumed_config(cfg: TrainConfig, ckpt: dict[str, Any], path: Path) -> TrainConfig:
    saved = ckpt.get("train_config")
    if not isinstance(saved, dict) or "preset" in saved:
        raise CheckpointError(f"{path} is not a language-model run; cannot resume it")
    known = {f.name for f in fields(TrainConfig)}
    merged = {k: v for k, v in saved.items() if k in known}
    merged.update({k: getattr(cfg, k) for k in _RESUME_OVERRIDES})
    if cfg.name:
        merged["name"] = cfg.name
    try:
        return TrainConfig(**merged)
    except (TypeError, TrainingError) as e:
        raise CheckpointError(f"{path} holds an unusable training config: {e}") from None


def _summary(metrics: dict[str, Any]) -> str:
    return (f"{metrics['steps']} steps, {metrics['train_time_s']:.0f} s: val "
            f"{metrics['val_nats_per_char']:.4f} nats/char "
            f"({metrics['val_bits_per_char']:.4f} bits/char)")


# --- the loop ------------------------------------------------------------------------------


def train(cfg: TrainConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Trains (or resumes) a language model; returns its final metrics."""
    d = init_distributed()
    try:
        return _train(cfg, d, log)
    finally:
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, d: Dist, log: Callable[[str], None] | None) -> dict[str, Any]:
    say = (log or tqdm.write) if d.main else (lambda _msg: None)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif d.world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // d.world))
    out = Path(cfg.out)
    ckpt_path = out / FILENAME
    if d.main and ckpt_path.exists() and not (cfg.resume or cfg.overwrite):
        raise TrainingError(
            f"{ckpt_path} exists: pass --resume to continue that run or --overwrite to replace it"
        )

    resumed = load_checkpoint(out) if cfg.resume else None
    if resumed:
        cfg = _resumed_config(cfg, resumed, ckpt_path)
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
    if resumed and resumed.get("corpus", {}).get("sha256") != corpus_info["sha256"]:
        raise CheckpointError(f"{ckpt_path} was trained on a different corpus; cannot resume")
    if train_dropped:  # the vocabulary of a resumed run may miss characters of new text
        raise CheckpointError("the corpus has characters outside the run's vocabulary")
    if len(val_ids) < 2:
        say("warning: no validation text; val loss is reported as nan")

    torch.manual_seed(cfg.seed)
    if resumed:
        model = model_from_checkpoint(resumed, ckpt_path).train()
    else:
        model = CharRNN(CharRNNConfig(len(vocab), cfg.embed_dim, cfg.hidden_size,
                                      cfg.num_layers, cfg.cell, cfg.dropout)).train()
    mcfg = model.config
    params = sum(p.numel() for p in model.parameters())
    runner: nn.Module = _TrainStep(model)
    if d.world > 1:
        runner = nn.parallel.DistributedDataParallel(runner)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    batches_cls = data.StreamBatches if cfg.state == "carry" else data.RandomWindows
    batches = batches_cls(train_ids, cfg.batch_size, cfg.bptt, cfg.seed, d.rank, d.world)

    step, train_time_s, chars_seen = 0, 0.0, 0
    history: dict[str, Any] = {"train": {"step": [], "time_s": [], "nats": []},
                               "val": {"step": [], "time_s": [], "nats": []}}
    if resumed:
        try:
            optimizer.load_state_dict(resumed["optimizer_state"])
            batches.load_state_dict(resumed["data_state"])
            step, train_time_s = int(resumed["step"]), float(resumed["train_time_s"])
            chars_seen, history = int(resumed["chars_seen"]), resumed["history"]
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{ckpt_path} cannot be resumed: {e}") from None
        say(f"resuming {ckpt_path} at step {step} ({train_time_s:.0f} s trained)")

    name = cfg.name or (resumed or {}).get("name") or f"{corpus_name}-{mcfg.cell}"
    say(f"{name}: {mcfg.cell} {mcfg.num_layers}x{mcfg.hidden_size} embed {mcfg.embed_dim}, "
        f"{params:,} params, vocab {len(vocab)}; train {len(train_ids):,} chars, val "
        f"{len(val_ids):,} (dropped {corpus_info['val_chars_dropped']}); batch "
        f"{cfg.batch_size}x{cfg.bptt} x {d.world} proc, {torch.get_num_threads()} threads")

    def progress_of(step: int, train_time_s: float) -> float:
        by_steps = step / cfg.max_steps if cfg.max_steps else 0.0
        by_time = train_time_s / (cfg.max_minutes * 60) if cfg.max_minutes else 0.0
        return max(by_steps, by_time)

    def checkpoint(metrics: dict[str, Any]) -> None:
        if not d.main:
            return
        save_checkpoint(ckpt_path, {
            "name": name,
            "model_config": mcfg.to_dict(),
            "vocab": list(vocab),
            "unk_id": None,
            "model_state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "optimizer_state": optimizer.state_dict(),
            "data_state": batches.state_dict(),
            "train_config": asdict(cfg),
            "step": step,
            "train_time_s": train_time_s,
            "chars_seen": chars_seen,
            "metrics": metrics,
            "history": history,
            "corpus": corpus_info,
            "versions": {"torch": torch.__version__},
        })
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        from .curves import save_run_curve  # matplotlib: only the process that writes needs it

        save_run_curve(history, out / "loss.png", f"{name}: {_summary(metrics)}")

    def validate(final: bool) -> dict[str, Any]:
        ids = val_ids if final else val_ids[: cfg.eval_chars]
        nats = evaluate(model, ids) if d.main else float("nan")
        d.barrier()
        history["val"]["step"].append(step)
        history["val"]["time_s"].append(train_time_s)
        history["val"]["nats"].append(nats)
        train_nats = history["train"]["nats"][-1] if history["train"]["nats"] else float("nan")
        return {
            "val_nats_per_char": nats, "val_bits_per_char": nats / LN2,
            "val_chars_evaluated": len(ids), "val_full": final or len(ids) == len(val_ids),
            "train_nats_per_char": train_nats, "train_bits_per_char": train_nats / LN2,
            "steps": step, "train_time_s": round(train_time_s, 2), "chars_seen": chars_seen,
            "params": params, "world_size": d.world, "corpus": corpus_info["name"],
            "corpus_sha256": corpus_info["sha256"],
            "val_chars_dropped": corpus_info["val_chars_dropped"],
        }

    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    state = model.initial_state(cfg.batch_size)
    bar = tqdm(total=cfg.max_steps, initial=step, unit="step", dynamic_ncols=True,
               disable=not (d.main and cfg.progress), file=sys.stderr)
    window_loss, window_n = 0.0, 0
    progress = progress_of(step, train_time_s)
    while progress < 1.0:
        t0 = time.perf_counter()
        lr = lr_at(cfg, step, progress)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y, fresh = batches.next()  # (B, T) each
        if fresh or cfg.state == "reset":
            state = model.initial_state(cfg.batch_size)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            logits, state = runner(x, state)  # (B, T, V), (S, B, H)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        state = state.detach().float()
        step += 1
        chars_seen += x.numel() * d.world
        train_time_s = d.max(train_time_s + time.perf_counter() - t0)
        progress = progress_of(step, train_time_s)

        window_loss, window_n = window_loss + loss.item(), window_n + 1
        if step % 10 == 0 or progress >= 1.0:
            nats = window_loss / window_n
            history["train"]["step"].append(step)
            history["train"]["time_s"].append(round(train_time_s, 3))
            history["train"]["nats"].append(nats)
            window_loss, window_n = 0.0, 0
            bar.set_postfix(loss=f"{nats:.3f}", bpc=f"{nats / LN2:.3f}", lr=f"{lr:.1e}",
                            min=f"{train_time_s / 60:.1f}")
        bar.update(1)
        if step % cfg.eval_every == 0 and progress < 1.0:
            metrics = validate(final=False)
            say(f"step {step}: val {metrics['val_nats_per_char']:.4f} nats/char "
                f"({metrics['val_bits_per_char']:.4f} bits/char), train "
                f"{metrics['train_nats_per_char']:.4f}, {train_time_s:.0f} s")
            checkpoint(metrics)
    bar.close()
    metrics = validate(final=True)
    checkpoint(metrics)
    say(f"done: {_summary(metrics)}; checkpoint {ckpt_path}")
    return metrics


# --- the seed's task -----------------------------------------------------------------------


def train_hello(out_dir: str | Path = "runs/hello", quiet: bool = False) -> dict[str, Any]:
    """Trains the seed's three models on hello -> ohlol and saves the embedding model as a run
    checkpoint in out_dir (vocab e h l o, cell rnn), ready for `export`.

    Returns {"models": {key: {"predicted", "loss", "epochs", "seed", "title"}},
             "all_ohlol": bool, "checkpoint": str}.
    """
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
    out = Path(out_dir)
    path = save_checkpoint(out / FILENAME, {
        "name": "hello-rnn",
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

    save_hello_curve(losses, out / "loss.png")
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
