"""Prometheus metrics, one registry per server instance (tests run several servers in one process).

    nextchar serve --metrics-port 9100
    curl -s 127.0.0.1:9100/metrics | grep ^nextchar_

| metric | type | labels | meaning |
|---|---|---|---|
| nextchar_requests_total | counter | method, code | finished RPCs by gRPC status code |
| nextchar_request_duration_seconds | histogram | method | whole RPC, as the server saw it |
| nextchar_queue_wait_seconds | histogram | | per text: batcher queue -> start of its model call |
| nextchar_compute_seconds | histogram | | per model call (one padded batch) |
| nextchar_batch_size_texts | histogram | | texts per model call |
| nextchar_queue_depth_texts | gauge | | texts waiting for (or in) the model |
| nextchar_in_flight_requests | gauge | | accepted RPCs not yet finished |
| nextchar_active_streams | gauge | | open Generate streams |
| nextchar_draining | gauge | | 1 once SIGTERM/stop began |
| nextchar_model_info | info | name, version, sha256, backend, device | what is served now |
| nextchar_model_reloads_total | counter | result | hot reloads: success / failure |
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

log = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                     2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("nextchar_requests", "Finished RPCs by method and gRPC status code.",
                                ["method", "code"], registry=r)
        self.request_seconds = Histogram(
            "nextchar_request_duration_seconds", "RPC duration on the server, seconds.",
            ["method"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.queue_seconds = Histogram(
            "nextchar_queue_wait_seconds",
            "Per text: from entering the batcher queue to the start of its model call, seconds.",
            buckets=LATENCY_BUCKETS_S, registry=r)
        self.compute_seconds = Histogram(
            "nextchar_compute_seconds", "Duration of one backend model call (one padded batch).",
            buckets=LATENCY_BUCKETS_S, registry=r)
        self.batch_texts = Histogram("nextchar_batch_size_texts", "Texts per backend model call.",
                                     buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("nextchar_queue_depth_texts",
                                 "Texts waiting for the model (or in it, batching off).", registry=r)
        self.in_flight = Gauge("nextchar_in_flight_requests", "Accepted RPCs not yet finished.",
                               registry=r)
        self.active_streams = Gauge("nextchar_active_streams", "Open Generate streams.", registry=r)
        self.draining = Gauge("nextchar_draining", "1 once a drain (SIGTERM, stop) began.",
                              registry=r)
        self.model = Info("nextchar_model", "The model version served now.", registry=r)
        self.reloads = Counter("nextchar_model_reloads", "Hot reload attempts by result.",
                               ["result"], registry=r)
        for result in ("success", "failure"):
            self.reloads.labels(result)  # both series exist from the start, at 0
        self._request_children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}
        self._http: WSGIServer | None = None

    # -- hooks the server wires in -----------------------------------------------------------
    def observe_batch(self, texts: int, padded_chars: int, compute_s: float) -> None:
        """Batcher.on_batch: runs on a backend executor thread (prometheus-client is thread-safe)."""
        self.batch_texts.observe(texts)
        self.compute_seconds.observe(compute_s)

    def observe_queue_waits(self, enqueued_at: Sequence[float]) -> None:
        """Batcher.on_batch_start: the `enqueued_at` (time.monotonic) of each text in a call."""
        now = time.monotonic()
        for t in enqueued_at:
            self.queue_seconds.observe(max(0.0, now - t))

    def observe_request(self, method: str, code: str, duration_s: float) -> None:
        # labels() takes a lock and builds a key on every call; the children are cached here
        # because this runs on the event loop for every RPC.
        children = self._request_children.get((method, code))
        if children is None:
            children = (self.requests.labels(method, code), self.request_seconds.labels(method))
            self._request_children[(method, code)] = children
        children[0].inc()
        children[1].observe(duration_s)

    def set_model(self, name: str, version: str, sha256: str, backend: str, device: str) -> None:
        self.model.info({"name": name, "version": version, "sha256": sha256, "backend": backend,
                         "device": device})

    def track_queue_depth(self, read: Callable[[], float]) -> None:
        self.queue_depth.set_function(read)

    def track_active_streams(self, read: Callable[[], float]) -> None:
        self.active_streams.set_function(read)

    # -- the HTTP endpoint -------------------------------------------------------------------
    def serve_http(self, host: str, port: int) -> int:
        """Starts /metrics on a daemon thread; returns the bound port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        bound = int(self._http.server_port)
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
