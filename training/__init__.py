"""Training and export of the character-level models. Needs `nextchar[train]`.

Public API (see docs/training.md):

    nextchar.training.cli.main(["train", ...] | ["export", ...]) -> int   # exit status
    nextchar.training.train.train(TrainConfig(...)) -> dict               # final metrics
    nextchar.training.train.train_hello(out_dir="runs/hello", quiet=False) -> dict
    nextchar.training.export.export_artifact(run_dir_or_checkpoint, out_dir, version=None) -> Path
    nextchar.training.export.build_random_artifact(out_dir, vocab, cell="rnn", embed_dim=8,
                                                   hidden_size=16, num_layers=2, seed=0) -> Path

Errors meant for the user derive from nextchar.training.errors.TrainingError.
"""
