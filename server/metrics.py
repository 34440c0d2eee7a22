"""Prometheus metrics, one registry per server instance (tests run several servers in one process).

    nextchar serve --metrics-port 9100
    curl -s 127.0.0.1:9100/metrics | grep ^nextchar_

| metric | type | labels | meaning |
|---|---|---|---|
| nextchar_requests_total | counter | method, code, protocol | finished calls by status code |
| nextchar_inference_requests_total | counter | model, version, result | inference requests of a model (Predict, V2 infer, each request of a ModelStreamInfer, Generate, completions): success / failure, as ModelStatistics counts them |
| nextchar_request_duration_seconds | histogram | method, protocol | whole call, as the server saw it |
| nextchar_queue_wait_seconds | histogram | model | per text: batcher queue -> start of its model call |
| nextchar_compute_seconds | histogram | model | per model call (one padded batch) |
| nextchar_batch_size_texts | histogram | model | texts per model call |
| nextchar_queue_depth_texts | gauge | model, lane | texts waiting for (or in) the model |
| nextchar_in_flight_requests | gauge | | accepted calls not yet finished |
| nextchar_active_streams | gauge | model | open Generate streams |
| nextchar_draining | gauge | | 1 once SIGTERM/stop began |
| nextchar_model_info | info | model, name, version, artifact_version, sha256, backend, device | what is served now, per model |
| nextchar_model_reloads_total | counter | model, result | loads and hot reloads: success / failure |

`protocol` is grpc (nextchar.v1, KServe V2, Admin) or http; `lane` is high or low. A model's
series go when it is unloaded (as Triton's do). The registry also exports prometheus-client's
process_* (CPU seconds, resident memory, open fds), python_info and python_gc_* collectors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .settings import host_port

if TYPE_CHECKING:
    from .runtime import ModelRuntime

log = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                     2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            r.register(collector)  # stateless readers of the process: shared by registries
        self.requests = Counter("nextchar_requests", "Finished calls by method and status code.",
                                ["method", "code", "protocol"], registry=r)
        self.inferences = Counter(
            "nextchar_inference_requests", "Inference requests of a model by result.",
            ["model", "version", "result"], registry=r)
        self.request_seconds = Histogram(
            "nextchar_request_duration_seconds", "Call duration on the server, seconds.",
            ["method", "protocol"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.queue_seconds = Histogram(
            "nextchar_queue_wait_seconds",
            "Per text: from entering the batcher queue to the start of its model call, seconds.",
            ["model"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.compute_seconds = Histogram(
            "nextchar_compute_seconds", "Duration of one backend model call (one padded batch).",
            ["model"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.batch_texts = Histogram("nextchar_batch_size_texts", "Texts per backend model call.",
                                     ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.in_flight = Gauge("nextchar_in_flight_requests", "Accepted calls not yet finished.",
                               registry=r)
        self.draining = Gauge("nextchar_draining", "1 once a drain (SIGTERM, stop) began.",
                              registry=r)
        self.model = Info("nextchar_model", "The model version served now, per model.",
                          ["model"], registry=r)
        self.reloads = Counter("nextchar_model_reloads", "Model loads and hot reloads by result.",
                               ["model", "result"], registry=r)
        self._runtimes: Callable[[], list[ModelRuntime]] = list
        r.register(_RuntimeGauges(lambda: self._runtimes()))
        self._request_children: dict[tuple[str, str, str], tuple[Counter, Histogram]] = {}
        self._inference_children: dict[tuple[str, str, bool], Counter] = {}
        self._unloaded: set[str] = set()  # models whose series went: late calls add none back
        self._http: WSGIServer | None = None

    # -- hooks the server wires in -----------------------------------------------------------
    def batch_hooks(self, model: str) -> tuple[Callable[[int, int, float], None],
                                                Callable[[list[float]], None]]:
        """(on_batch, on_batch_start) for one model's batcher; both run on executor threads
        (prometheus-client is thread-safe), with the model's children looked up once."""
        batch_texts = self.batch_texts.labels(model)
        compute = self.compute_seconds.labels(model)
        queue = self.queue_seconds.labels(model)

        def on_batch(texts: int, padded_chars: int, compute_s: float) -> None:
            batch_texts.observe(texts)
            compute.observe(compute_s)

        def on_batch_start(enqueued_at: Sequence[float]) -> None:
            now = time.monotonic()
            for t in enqueued_at:
                queue.observe(max(0.0, now - t))

        for result in ("success", "failure"):
            self.reloads.labels(model, result)  # both series exist from the first load, at 0
        return on_batch, on_batch_start

    def observe_request(self, method: str, code: str, duration_s: float,
                        protocol: str = "grpc") -> None:
        # labels() takes a lock and builds a key on every call; the children are cached here
        # because this runs on the event loop for every call.
        key = (method, code, protocol)
        children = self._request_children.get(key)
        if children is None:
            children = (self.requests.labels(method, code, protocol),
                        self.request_seconds.labels(method, protocol))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(duration_s)

    def inference_done(self, model: str, version: str, ok: bool) -> None:
        """One inference request of `model` answered (ok) or refused/failed; on the loop."""
        key = (model, version, ok)
        child = self._inference_children.get(key)
        if child is None:
            if model in self._unloaded:  # a call of a version retired by an unload, ending
                return
            child = self._inference_children[key] = self.inferences.labels(
                model, version, "success" if ok else "failure")
        child.inc()

    def set_model(self, rt: ModelRuntime) -> None:
        self._unloaded.discard(rt.name)
        a, b = rt.artifact, rt.backend
        self.model.labels(rt.name).info({
            "name": rt.name, "version": rt.version, "artifact_version": a.version,
            "sha256": a.sha256, "backend": b.name, "device": b.device})

    def clear_model(self, model: str) -> None:
        """Drops every series of an unloaded model, so dashboards stop showing it (a later load
        starts them again at 0). Its calls still running count in ModelStatistics only."""
        self._unloaded.add(model)
        for metric in (self.model, self.queue_seconds, self.compute_seconds, self.batch_texts):
            _remove(metric, model)
        for result in ("success", "failure"):
            _remove(self.reloads, model, result)
        for key in [k for k in self._inference_children if k[0] == model]:
            del self._inference_children[key]
            _remove(self.inferences, model, key[1], "success" if key[2] else "failure")

    def track_runtimes(self, read: Callable[[], list[ModelRuntime]]) -> None:
        """Queue depth and active streams are read from the runtimes at scrape time."""
        self._runtimes = read

    # -- the HTTP endpoint -------------------------------------------------------------------
    def serve_http(self, host: str, port: int) -> int:
        """Starts /metrics on a daemon thread; returns the bound port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        bound = int(self._http.server_port)
        log.info("metrics on http://%s/metrics", host_port(host, bound))
        return bound

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def _remove(metric: Counter | Histogram | Info, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:  # never observed
        pass


class _RuntimeGauges(Collector):
    """Per-model gauges computed at scrape time: queue depth per lane and open streams (old
    versions still finishing calls count toward their model)."""

    def __init__(self, runtimes: Callable[[], list[ModelRuntime]]) -> None:
        self._runtimes = runtimes

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from .batcher import LANE_NAMES

        depth = GaugeMetricFamily("nextchar_queue_depth_texts",
                                  "Texts waiting for the model (or in it, batching off).",
                                  labels=["model", "lane"])
        streams = GaugeMetricFamily("nextchar_active_streams", "Open Generate streams.",
                                    labels=["model"])
        totals: dict[tuple[str, str], int] = {}
        open_streams: dict[str, int] = {}
        for rt in self._runtimes():
            for lane, name in enumerate(LANE_NAMES):
                key = (rt.name, name)
                totals[key] = totals.get(key, 0) + rt.batcher.lane_depth(lane)
            open_streams[rt.name] = open_streams.get(rt.name, 0) + rt.generator.active_streams
        for (model, lane_name), texts in sorted(totals.items()):
            depth.add_metric([model, lane_name], texts)
        for model, count in sorted(open_streams.items()):
            streams.add_metric([model], count)
        yield depth
        yield streams

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())
