"""Text from a checkpoint, for a look at what a run learned (eager PyTorch on the CPU).

    python -m nextchar.training.sample runs/mine --prompt "ROMEO:" --chars 300
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from .checkpoint import checkpoint_path, load_checkpoint, model_from_checkpoint
from .errors import TrainingError


@torch.no_grad()
def sample_text(run_or_file: str | Path, prompt: str = "\n", chars: int = 300,
                temperature: float = 0.8, seed: int = 0, which: str = "best") -> str:
    """`chars` characters sampled after `prompt` from the run's best (or last) checkpoint."""
    path = checkpoint_path(run_or_file, which)
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, path)
    index = {c: i for i, c in enumerate(ckpt["vocab"])}
    missing = sorted({c for c in prompt if c not in index})
    if missing or not prompt:
        raise TrainingError(f"the prompt must be non-empty and in the vocabulary; not in it: "
                            f"{missing}")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[index[c] for c in prompt]])
    logits, state = model.forward_train(ids)  # (1, T, V)
    out = []
    for _ in range(chars):
        probs = torch.softmax(logits[0, -1] / max(temperature, 1e-6), dim=-1)
        nxt = int(torch.multinomial(probs, 1, generator=generator))
        out.append(ckpt["vocab"][nxt])
        logits, state = model.forward_train(torch.tensor([[nxt]]), state)
    return prompt + "".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nextchar-sample", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="run folder or checkpoint file")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a new line)")
    p.add_argument("--chars", type=int, default=300, help="characters to sample (default: 300)")
    p.add_argument("--temperature", type=float, default=0.8, help="(default: 0.8)")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best",
                   help="(default: best)")
    args = p.parse_args(argv)
    if not 0 <= args.temperature < math.inf:  # also nan: softmax of nan has no sample
        p.error(f"--temperature must be >= 0 and finite, got {args.temperature}")
    if args.chars < 0:
        p.error(f"--chars must be >= 0, got {args.chars}")
    if not -(2**63) <= args.seed < 2**64:  # what torch.Generator.manual_seed takes
        p.error(f"--seed must be in -2**63..2**64-1, got {args.seed}")
    try:
        print(sample_text(args.run, args.prompt, args.chars, args.temperature, args.seed,
                          args.checkpoint))
    except TrainingError as e:
        print(f"nextchar-sample: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
