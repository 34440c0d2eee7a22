"""Render deploy/grafana/nextchar.json's panels from a real server, without Grafana.

    .venv/bin/python deploy/grafana/render_preview.py --out docs/grafana-dashboard.png

What it does, in order:
1. builds two artifacts through the real export code (random weights, the default model's
   shape: LSTM 1x512, embed 64; a GRU 1x256) into a model repository (or a version repository
   when the server has no --model-repository yet);
2. starts `nextchar serve` (this venv) with metrics on, and scrapes /metrics every second, as
   Prometheus would (adding `instance`);
3. drives about 80 s of load from this process (`--seconds`): Predict at rising concurrency on
   both models, Generate streams, KServe V2 REST calls on the HTTP front end, a `nextchar
   batch` job (low priority lane), some bad calls, a new version (a reload) and a broken one
   (a failed reload); then SIGTERM (draining);
4. evaluates every panel's PromQL from the dashboard file over the scraped samples with the
   small evaluator below (the subset the dashboard uses: selectors, rate, increase,
   histogram_quantile, sum/max by, binary `/`), and draws the panels on the dashboard's grid.

The evaluator follows Prometheus' semantics except that rate() and increase() do not
extrapolate to the window's edges (Prometheus does), so values near a window's edges differ
slightly. The load is short and small on purpose (shared 2-core machines): the picture shows
what each panel looks like, not this server's capacity (docs/benchmarks.md has those figures).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# nextchar serve's HTTP front end defaults to port 8000: servers this script starts pick a free
# one, so they never collide with each other or with a server already on 8000.
os.environ.setdefault("NEXTCHAR_HTTP_PORT", "0")

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "nextchar.json"
VOCAB = "\n !',.;:?-abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
CORPUS = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
          "the slings and arrows of outrageous fortune, or to take arms against a sea of "
          "troubles, and by opposing end them.")

Labels = frozenset  # of (name, value) pairs
Series = dict[Labels, list[tuple[float, float]]]


# --- scraping ---------------------------------------------------------------------------------

class Scraper(threading.Thread):
    """GET /metrics every `every_s`, samples kept per series with the scrape's time."""

    def __init__(self, url: str, instance: str, every_s: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.url, self.instance, self.every_s = url, instance, every_s
        self.series: dict[str, Series] = defaultdict(lambda: defaultdict(list))
        self.stop = threading.Event()
        self.scrapes = 0

    def run(self) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        while not self.stop.is_set():
            t = time.monotonic()
            try:
                text = urllib.request.urlopen(self.url, timeout=2).read().decode()
            except OSError:
                text = None
            if text is not None:
                for family in text_string_to_metric_families(text):
                    for s in family.samples:
                        labels = Labels({**s.labels, "instance": self.instance,
                                         "job": "nextchar"}.items())
                        self.series[s.name][labels].append((t, float(s.value)))
                self.scrapes += 1
            self.stop.wait(max(0.0, self.every_s - (time.monotonic() - t)))


# --- a small PromQL evaluator over the scraped samples ---------------------------------------

class Evaluator:
    LOOKBACK_S = 300.0

    def __init__(self, series: dict[str, Series]) -> None:
        self.series = series
        # Every scrape's time: a series missing from the latest scrape before t is stale at t
        # (Prometheus writes a staleness marker when a series disappears from a target).
        self.scrapes = sorted({ts for s in series.values() for v in s.values() for ts, _ in v})

    def latest_scrape(self, t: float) -> float | None:
        before = [s for s in self.scrapes if s <= t]
        return before[-1] if before else None

    def instant(self, node: Any, t: float) -> dict[Labels, float] | float:
        import promql_parser as p

        if isinstance(node, p.NumberLiteral):
            return float(node.val)
        if isinstance(node, p.ParenExpr):
            return self.instant(node.expr, t)
        if isinstance(node, p.VectorSelector):
            out = {}
            scrape = self.latest_scrape(t)
            for labels, samples in self.select(node):
                last = [(ts, v) for ts, v in samples if t - self.LOOKBACK_S < ts <= t]
                if last and last[-1][0] == scrape:
                    out[labels] = last[-1][1]
            return out
        if isinstance(node, p.Call):
            name = node.func.name
            if name in ("rate", "increase"):
                ms = node.args[0]
                window = ms.range.total_seconds()
                out = {}
                for labels, samples in self.select(ms.vector_selector):
                    pts = [(ts, v) for ts, v in samples if t - window < ts <= t]
                    if len(pts) < 2:
                        continue
                    delta = sum(max(b - a, 0.0) if b >= a else b
                                for (_, a), (_, b) in zip(pts, pts[1:], strict=False))
                    span = pts[-1][0] - pts[0][0]
                    out[drop_name(labels)] = delta / span if name == "rate" else delta
                return out
            if name == "histogram_quantile":
                q = self.instant(node.args[0], t)
                vec = self.instant(node.args[1], t)
                assert isinstance(q, float) and isinstance(vec, dict)
                return histogram_quantile(q, vec)
            raise NotImplementedError(f"function {name}")
        if isinstance(node, p.AggregateExpr):
            vec = self.instant(node.expr, t)
            assert isinstance(vec, dict)
            keep = set(node.modifier.labels) if node.modifier is not None else set()
            groups: dict[Labels, list[float]] = defaultdict(list)
            for labels, v in vec.items():
                groups[Labels((k, x) for k, x in labels if k in keep)].append(v)
            op = str(node.op)
            if op == "sum":
                return {g: sum(vs) for g, vs in groups.items()}
            if op == "max":
                return {g: max(vs) for g, vs in groups.items()}
            raise NotImplementedError(f"aggregation {op}")
        if isinstance(node, p.BinaryExpr):
            lhs, rhs = self.instant(node.lhs, t), self.instant(node.rhs, t)
            op = str(node.op)
            assert op == "/", f"binary {op}"
            if isinstance(lhs, dict) and isinstance(rhs, dict):
                return {k: divide(v, rhs[k]) for k, v in lhs.items() if k in rhs}
            raise NotImplementedError("scalar division")
        raise NotImplementedError(type(node).__name__)

    def select(self, vs: Any) -> Iterator[tuple[Labels, list[tuple[float, float]]]]:
        import promql_parser as p

        def ok(m: Any, have: str) -> bool:
            if m.op == p.MatchOp.Equal:
                return bool(have == m.value)
            if m.op == p.MatchOp.NotEqual:
                return bool(have != m.value)
            found = re.fullmatch(m.value, have) is not None
            return found if m.op == p.MatchOp.Re else not found

        matchers = list(vs.matchers.matchers)
        for labels, samples in self.series.get(vs.name, {}).items():
            d = dict(labels)
            if all(ok(m, d.get(m.name, "")) for m in matchers):
                yield Labels({**d, "__name__": vs.name}.items()), samples


def dump_samples(series: dict[str, Series]) -> list[Any]:
    return [[name, sorted(labels), samples] for name, s in series.items()
            for labels, samples in s.items()]


def load_samples(rows: list[Any]) -> dict[str, Series]:
    series: dict[str, Series] = defaultdict(lambda: defaultdict(list))
    for name, labels, samples in rows:
        series[name][Labels(tuple(x) for x in labels)] = [tuple(x) for x in samples]
    return series


def drop_name(labels: Labels) -> Labels:
    return Labels((k, v) for k, v in labels if k != "__name__")


def divide(a: float, b: float) -> float:
    if b == 0:
        return math.nan if a == 0 else math.copysign(math.inf, a)
    return a / b


def histogram_quantile(q: float, vec: dict[Labels, float]) -> dict[Labels, float]:
    """Prometheus' bucket interpolation: linear inside the bucket the rank falls in."""
    groups: dict[Labels, list[tuple[float, float]]] = defaultdict(list)
    for labels, v in vec.items():
        d = dict(labels)
        le = float(d.pop("le"))
        d.pop("__name__", None)
        groups[Labels(d.items())].append((le, v))
    out = {}
    for g, buckets in groups.items():
        buckets.sort()
        total = buckets[-1][1]
        if total <= 0 or not math.isinf(buckets[-1][0]):
            out[g] = math.nan
            continue
        rank = q * total
        prev_le, prev_count = 0.0, 0.0
        for le, count in buckets:
            if count >= rank:
                if math.isinf(le):
                    out[g] = prev_le  # the highest finite bound, as Prometheus answers
                elif count == prev_count:
                    out[g] = le
                else:
                    out[g] = prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
                break
            prev_le, prev_count = le, count
    return out


def interpolate(expr: str, rate_interval: str, range_s: float) -> str:
    """What Grafana sends with every variable at All."""
    expr = expr.replace("$__rate_interval", rate_interval)
    expr = expr.replace("$__range", f"{int(range_s)}s")
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def legend(fmt: str, labels: Labels) -> str:
    d = dict(labels)
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: d.get(m.group(1), ""), fmt or "")
    return re.sub(r"\s+", " ", text).strip() or ", ".join(f"{k}={v}" for k, v in sorted(d.items()))


# --- the server and its load ------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_help() -> str:
    return subprocess.run([sys.executable, "-m", "nextchar.client.cli", "serve", "--help"],
                          capture_output=True, text=True, timeout=60).stdout


def build_models(work: Path, repository: bool) -> tuple[Path, list[str]]:
    from nextchar.training.export import build_random_artifact

    specs = {"lstm": dict(cell="lstm", embed_dim=64, hidden_size=512, num_layers=1, seed=0),
             "gru": dict(cell="gru", embed_dim=32, hidden_size=256, num_layers=1, seed=1)}
    root = work / "models"
    if not repository:  # one model, versions under it (hot reload still shows)
        specs = {"lstm": specs["lstm"]}
    for name, spec in specs.items():
        target = root / name / "1" if repository else root / "1"
        build_random_artifact(target, vocab=VOCAB, name=name, version="1", **spec)  # type: ignore[arg-type]
    return root, list(specs)


def add_version(root: Path, model: str | None, version: str, broken: bool, seed: int) -> None:
    from nextchar.training.export import build_random_artifact

    base = root / model if model else root
    staging = base / f".v{version}"
    build_random_artifact(staging, vocab=VOCAB, cell="lstm", embed_dim=64, hidden_size=512,
                          num_layers=1, seed=seed, version=version, name=model or "lstm")
    if broken:  # a weight file that no longer matches the manifest's checksum
        onnx = next(staging.glob("*.onnx"))
        onnx.write_bytes(onnx.read_bytes()[:-64] + b"\0" * 64)
    staging.rename(base / version)


def drive(address: str, models: list[str], seconds: float, batch_input: Path, out_dir: Path,
          add: Callable[[int], None], http_base: str | None) -> dict[str, int]:
    """The load, phase by phase; returns call counts by outcome."""
    from nextchar.client import NextCharClient, NextCharError

    counts: dict[str, int] = defaultdict(int)
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    start = time.monotonic()
    rng = random.Random(7)

    def phase() -> float:
        return (time.monotonic() - start) / seconds

    def count(key: str) -> None:
        with lock:
            counts[key] += 1

    def predictor(worker: int) -> None:
        with NextCharClient(address, timeout_s=10) as c:
            while time.monotonic() < stop_at:
                f = phase()
                # concurrency rises: 2 workers, then 8, then all 24 (a burst), then 4
                active = 2 if f < 0.15 else 8 if f < 0.55 else 24 if f < 0.8 else 4
                if worker >= active:
                    time.sleep(0.2)
                    continue
                n = rng.choice((1, 1, 4, 16))
                texts = [CORPUS[: rng.randint(10, len(CORPUS))] for _ in range(n)]
                model = models[worker % len(models)] if len(models) > 1 else ""
                try:
                    c.predict(texts, top_k=3, model=model)
                    count("predict OK")
                except NextCharError as e:
                    count(f"predict {e.code.name}")

    def streamer(worker: int) -> None:
        with NextCharClient(address, timeout_s=30) as c:
            while time.monotonic() < stop_at:
                if not 0.3 < phase() < 0.7:
                    time.sleep(0.2)
                    continue
                model = models[worker % len(models)] if len(models) > 1 else ""
                try:
                    for _ in c.generate("To be, or", max_chars=200, temperature=0.8, seed=worker,
                                        model=model):
                        pass
                    count("generate OK")
                except NextCharError as e:
                    count(f"generate {e.code.name}")

    def troublemaker() -> None:
        with NextCharClient(address, timeout_s=5) as c:
            while time.monotonic() < stop_at:
                if 0.45 < phase() < 0.75:
                    for texts, model in ((["abc~"], ""), (["hello"], "no-such-model")):
                        try:
                            c.predict(texts, model=model)
                        except NextCharError as e:
                            count(f"bad call {e.code.name}")
                time.sleep(0.25)

    def http_caller(worker: int) -> None:
        """KServe V2 REST infer on the HTTP front end, and now and then a model that is not there."""
        model = models[worker % len(models)] if len(models) > 1 else models[0]
        while time.monotonic() < stop_at and http_base:
            f = phase()
            if not 0.1 < f < 0.9:
                time.sleep(0.2)
                continue
            name = "no-such-model" if rng.random() < 0.05 else model
            body = json.dumps({"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES",
                                           "data": [CORPUS[:40], CORPUS[:90]]}]}).encode()
            req = urllib.request.Request(f"{http_base}/v2/models/{name}/infer", data=body,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    r.read()
                count("http 200")
            except urllib.error.HTTPError as e:
                count(f"http {e.code}")
            except OSError:
                count("http error")

    def batch_job() -> None:
        while phase() < 0.35:
            time.sleep(0.2)
        proc = subprocess.Popen(
            [sys.executable, "-m", "nextchar.client.cli", "batch", str(batch_input), "-o",
             str(out_dir / "batch.jsonl"), "--server", address, "--concurrency", "8",
             "--no-progress", "--restart"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and phase() < 0.75:
            time.sleep(0.2)
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=30)

    def reloads() -> None:
        for at, step in ((0.5, 0), (0.65, 1)):
            while phase() < at:
                time.sleep(0.2)
            add(step)

    with ThreadPoolExecutor(44) as pool:
        jobs = [pool.submit(predictor, w) for w in range(24)]
        jobs += [pool.submit(streamer, w) for w in range(8)]
        jobs += [pool.submit(http_caller, w) for w in range(4)]
        jobs += [pool.submit(troublemaker), pool.submit(batch_job), pool.submit(reloads)]
        for j in jobs:
            j.result()
    return dict(counts)


# --- drawing ----------------------------------------------------------------------------------

def draw(dashboard: dict[str, Any], ev: Evaluator, times: list[float], t0: float, out: Path,
         subtitle: str, rate_interval: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import promql_parser as p

    panels = dashboard["panels"]
    rows = max(pn["gridPos"]["y"] + pn["gridPos"]["h"] for pn in panels)
    unit_in, head_in, width_in = 0.5, 0.8, 24.0  # inches per grid row, for the title, in all
    height_in = rows * unit_in + head_in
    fig = plt.figure(figsize=(width_in, height_in), facecolor="#111217")
    fig.text(0.01, 1 - 0.35 / height_in, f"{dashboard['title']}: the panels of "
             f"{DASHBOARD.relative_to(ROOT)} over a real server's /metrics", color="#d8d9da",
             fontsize=16, weight="bold", va="center")
    fig.text(0.01, 1 - 0.65 / height_in, subtitle, color="#9fa7b3", fontsize=11, va="center")

    def box(g: dict[str, int], top_pad: float, bottom_pad: float) -> list[float]:
        """Figure coordinates of a grid cell, with room for a title above and ticks below."""
        left = 0.035 + 0.96 * g["x"] / 24 + 0.004
        width = 0.96 * g["w"] / 24 - 0.03
        top = height_in - head_in - g["y"] * unit_in - top_pad
        bottom = height_in - head_in - (g["y"] + g["h"]) * unit_in + bottom_pad
        return [left, bottom / height_in, width, (top - bottom) / height_in]

    span_s = times[-1] - times[0]
    units = {"reqps": "calls/s", "s": "seconds", "percentunit": "", "short": ""}
    for pn in panels:
        g = pn["gridPos"]
        if pn["type"] == "row":
            fig.text(0.01, (height_in - head_in - (g["y"] + 0.6) * unit_in) / height_in,
                     pn["title"], color="#d8d9da", fontsize=13, weight="bold")
            continue
        ax = fig.add_axes(box(g, 0.35, 0.45 if pn["type"] == "timeseries" else 0.1))
        ax.set_facecolor("#181b1f")
        for spine in ax.spines.values():
            spine.set_color("#2c3235")
        ax.tick_params(colors="#9fa7b3", labelsize=8)
        ax.set_title(pn["title"], color="#d8d9da", fontsize=11, loc="left")
        unit = pn.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        if pn["type"] == "table":
            target = pn["targets"][0]
            vec = ev.instant(p.parse(interpolate(target["expr"], rate_interval, span_s)),
                             times[-1])
            ax.axis("off")
            ax.set_title(pn["title"], color="#d8d9da", fontsize=11, loc="left")
            rows_ = [dict(k) for k in sorted(vec, key=sorted)] if isinstance(vec, dict) else []
            cols = [c for c in ("instance", "model", "version", "backend", "device")
                    if any(c in r for r in rows_)]
            for i, r in enumerate([dict(zip(cols, cols, strict=True)), *rows_][:8]):
                ax.text(0.01, 0.9 - i * 0.12, "   ".join(f"{r.get(c, ''):<14}" for c in cols),
                        color="#d8d9da" if i else "#6e9fff", family="monospace", fontsize=9,
                        transform=ax.transAxes)
            continue
        if pn["type"] == "stat":
            target = pn["targets"][0]
            node = p.parse(interpolate(target["expr"], rate_interval, span_s))
            calc = pn.get("options", {}).get("reduceOptions", {}).get("calcs", ["lastNotNull"])[0]
            if "$__range" in target["expr"]:  # one value over the whole range
                vec = ev.instant(node, times[-1])
            else:  # Grafana's reduction of the series over the range
                per: dict[Labels, list[float]] = defaultdict(list)
                for t in times:
                    v_t = ev.instant(node, t)
                    for labels, v in (v_t.items() if isinstance(v_t, dict) else []):
                        if not math.isnan(v):
                            per[labels].append(v)
                vec = {k: (sum(vs) / len(vs) if calc == "mean" else max(vs) if calc == "max"
                           else vs[-1]) for k, vs in per.items() if vs}
            ax.set_xticks([])
            ax.set_yticks([])
            items = sorted(vec.items(), key=lambda kv: sorted(kv[0])) if isinstance(vec, dict) else []
            if not items:
                ax.text(0.5, 0.5, "no data", color="#9fa7b3", ha="center", va="center",
                        transform=ax.transAxes)
            shown_items = items[:6]
            for i, (labels, v) in enumerate(shown_items):
                text = f"{v:.1%}" if unit == "percentunit" else f"{v:g}"
                cols = min(len(shown_items), 2)
                x = (i % cols + 0.5) / cols
                y = 0.62 - (i // cols) * 0.32 if len(shown_items) > 2 else 0.55
                ax.text(x, y, text, color="#73bf69", ha="center", va="center",
                        fontsize=22 if len(shown_items) == 1 else 15, weight="bold",
                        transform=ax.transAxes)
                ax.text(x, y - 0.13, legend(target.get("legendFormat", ""), labels),
                        color="#9fa7b3", ha="center", va="center", fontsize=8,
                        transform=ax.transAxes)
            continue
        drawn = 0
        for target in pn["targets"]:
            node = p.parse(interpolate(target["expr"], rate_interval, span_s))
            lines: dict[Labels, list[float]] = defaultdict(lambda: [math.nan] * len(times))
            for i, t in enumerate(times):
                vec = ev.instant(node, t)
                if isinstance(vec, dict):
                    for labels, v in vec.items():
                        lines[labels][i] = v
            for labels, ys in sorted(lines.items(), key=lambda kv: sorted(kv[0])):
                if all(math.isnan(y) for y in ys):
                    continue
                ax.plot([t - t0 for t in times], ys, lw=1.3,
                        label=legend(target.get("legendFormat", ""), labels))
                drawn += 1
        if drawn:
            ax.legend(fontsize=7, loc="upper left", framealpha=0.3, labelcolor="#d8d9da",
                      facecolor="#181b1f", edgecolor="#2c3235", ncol=2 if drawn > 4 else 1)
        else:
            ax.text(0.5, 0.5, "no data", color="#9fa7b3", ha="center", transform=ax.transAxes)
        ax.set_ylabel(units.get(unit, unit), color="#9fa7b3", fontsize=8)
        if unit == "s":
            ax.set_yscale("log")
        ax.grid(color="#2c3235", lw=0.5)
        ax.set_xlim(0, times[-1] - t0)
        ax.set_xlabel("seconds", color="#9fa7b3", fontsize=8)
    fig.savefig(out, dpi=64, facecolor=fig.get_facecolor())


# --- main -------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "grafana-dashboard.png")
    ap.add_argument("--seconds", type=float, default=80.0, help="load duration")
    ap.add_argument("--rate-interval", default="10s", help="what $__rate_interval becomes")
    ap.add_argument("--keep", type=Path, default=None, help="keep the work dir (models, logs) here")
    ap.add_argument("--save-samples", type=Path, default=None,
                    help="also write the scraped samples (JSON) here")
    ap.add_argument("--from-samples", type=Path, default=None,
                    help="draw from samples saved by --save-samples; no server, no load")
    args = ap.parse_args(argv)
    dashboard = json.loads(DASHBOARD.read_text())
    if args.from_samples:
        saved = json.loads(args.from_samples.read_text())
        series = load_samples(saved["series"])
        times = sorted({ts for s in series.values() for v in s.values() for ts, _ in v})
        draw(dashboard, Evaluator(series), times, saved["t0"], args.out, saved["subtitle"],
             saved["rate_interval"])
        print(f"wrote {args.out} from {args.from_samples}: {saved['subtitle']}")
        return 0

    work = Path(tempfile.mkdtemp(prefix="nextchar-grafana-"))
    repository = "--model-repository" in serve_help()  # the server before issue 13 had none
    root, models = build_models(work, repository)
    port, mport = free_port(), free_port()
    cmd = [sys.executable, "-m", "nextchar.client.cli", "serve", "--host", "127.0.0.1",
           "--port", str(port), "--metrics-port", str(mport), "--poll-s", "2",
           "--prestop-s", "3", "--grace-s", "10", "--backend-workers", "2",
           "--intra-op-threads", "1"]
    cmd += ["--model-repository", str(root)] if repository else ["--model", str(root)]
    help_text = serve_help()
    if repository and "--default-model" in help_text:
        cmd += ["--default-model", models[0]]
    http_base = None
    if "--http-port" in help_text:  # the HTTP front end, on a free port (not 8000)
        http_port = free_port()
        cmd += ["--http-port", str(http_port)]
        http_base = f"http://127.0.0.1:{http_port}"
    log = (work / "server.log").open("w")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXTCHAR_")}
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                              start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        from nextchar.client import NextCharClient

        deadline = time.monotonic() + 120
        while True:
            try:
                with NextCharClient(address, timeout_s=2) as c:
                    if c.health() == "SERVING":
                        break
            except Exception:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start: {(work / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        batch_input = work / "batch.txt"
        rng = random.Random(3)
        batch_input.write_text("".join(CORPUS[: rng.randint(20, len(CORPUS))] + "\n"
                                       for _ in range(40000)))
        scraper = Scraper(f"http://127.0.0.1:{mport}/metrics", address)
        scraper.start()
        t0 = time.monotonic()

        def add(step: int) -> None:
            model = models[0] if repository else None
            other = models[-1] if repository else None
            if step == 0:
                add_version(root, model, "2", broken=False, seed=11)
            else:
                add_version(root, other, "3", broken=True, seed=12)

        counts = drive(address, models, args.seconds, batch_input, work, add, http_base)
        time.sleep(3)
        server.send_signal(signal.SIGTERM)  # draining shows in the last scrapes (pre-stop 3 s)
        server.wait(timeout=60)
        scraper.stop.set()
        scraper.join()
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
    times = sorted({ts for s in scraper.series.values() for v in s.values() for ts, _ in v})
    subtitle = (f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {len(models)} model(s), "
                f"random weights, {args.seconds:.0f} s of load on a shared 2-core machine, "
                f"{scraper.scrapes} scrapes, $__rate_interval={args.rate_interval}")
    if args.save_samples:
        args.save_samples.write_text(json.dumps({
            "t0": t0, "subtitle": subtitle, "rate_interval": args.rate_interval,
            "series": dump_samples(scraper.series)}))
    draw(dashboard, Evaluator(scraper.series), times, t0, args.out, subtitle, args.rate_interval)
    print(f"wrote {args.out}: {subtitle}")
    print("calls:", json.dumps(dict(sorted(counts.items()))))
    if args.keep:
        shutil.copytree(work, args.keep, dirs_exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
