#!/bin/sh
# The compose `train` job: train the default model and export it to $NEXTCHAR_MODEL, once.
# When $NEXTCHAR_MODEL already holds an artifact (manifest.json) it exits 0 at once, so
# `docker compose up` retrains nothing; delete the folder (or the volume) to retrain.
#
#   NEXTCHAR_MODEL=/models/default NEXTCHAR_TRAIN_ARGS="--max-minutes 10" nextchar-train-once
#
# NEXTCHAR_TRAIN_ARGS: extra `nextchar train` flags (default: the default corpus, 10 minutes).
# NEXTCHAR_RUN_DIR: the training run (checkpoints, curves); default beside the artifact.
set -eu

artifact=${NEXTCHAR_MODEL:-/models/default}
run=${NEXTCHAR_RUN_DIR:-$(dirname "$artifact")/runs/$(basename "$artifact")}
say() { echo "nextchar-train-once: $*"; }

if [ -f "$artifact/manifest.json" ]; then
  say "$artifact already holds an artifact: nothing to do (delete it to retrain)"
  exit 0
fi
rmdir "$artifact" 2>/dev/null || true  # an empty folder left by a volume mount
if [ -e "$artifact" ]; then
  say "$artifact exists but holds no manifest.json: refusing to overwrite it" >&2
  exit 1
fi

say "training into $run (flags: ${NEXTCHAR_TRAIN_ARGS:-none})"
# A run left by an interrupted attempt is started over (--overwrite): same flags, same result.
# shellcheck disable=SC2086  # NEXTCHAR_TRAIN_ARGS is a list of flags, split on purpose
nextchar train --no-progress ${NEXTCHAR_TRAIN_ARGS:-} --overwrite --out "$run"

# Export next to the target and rename: a server never sees half an artifact.
partial="$artifact.partial"
rm -rf "$partial"
nextchar export "$run" -o "$partial"
mv "$partial" "$artifact"
say "exported $artifact"
