"""OpenTelemetry tracing, optional: `pip install 'nextchar[otel]'`, then `nextchar serve --otel`.
Off (the default), nothing here is imported or called: telemetry.py and the batcher check one
`is None` per call.

The spans of one call, on gRPC and HTTP alike (docs/tracing.md):

    <method>            SERVER span, receive -> answer handed to the transport; its parent is the
                        caller's `traceparent` (gRPC metadata or HTTP header) when it sends one
      nextchar.queue    this call's texts: entered the batcher queue -> their model call began
      nextchar.model    the model call its texts were in: nextchar.batch.id, .texts, .requests;
                        linked to the other calls that shared it (batch membership)
      nextchar.send     last model call's end -> the call ended (decoding, encoding, sending)

The batcher runs on worker threads, so it does not use the context: an item carries its call's
`CallTrace`, captured on the event loop when it was queued. Sampling is parent-based with
`--otel-sample-ratio` for new traces; unsampled calls make no batcher spans.
"""

from __future__ import annotations

import contextvars
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    from .settings import ServerSettings

_current: contextvars.ContextVar[CallTrace | None] = contextvars.ContextVar(
    "nextchar_call_trace", default=None)
_batch_ids = itertools.count(1)


@dataclass
class CallTrace:
    """One traced call: its SERVER span, the context token to detach, its last model call."""

    span: Any
    token: Any
    last_model_end_ns: int = 0
    texts: int = field(default=0)
    http: bool = False  # the call's protocol: its status is an HTTP status, else a gRPC name


# OpenTelemetry's semantic conventions for RPC and HTTP server spans: what trace backends group
# and filter by (rpc.service / rpc.method, http.route, the status as a number).
_GRPC_CODES = {code.name: code.value[0] for code in grpc.StatusCode}


def _call_attributes(method: str, protocol: str) -> dict[str, str]:
    """`method`: a gRPC path (/pkg.Service/Method) or an HTTP route label ("POST /v1/models")."""
    if protocol == "http":
        verb, _, route = method.partition(" ")
        # A path no route matched has no http.route (the convention: leave it out).
        return {"http.request.method": verb, **({} if route == "(unknown)" else
                                               {"http.route": route})}
    service, _, name = method.lstrip("/").rpartition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


class Tracing:
    def __init__(self, settings: ServerSettings, processors: Sequence[Any] = ()) -> None:
        from opentelemetry import context, trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._context, self._trace = context, trace
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": settings.otel_service_name}),
            sampler=ParentBased(TraceIdRatioBased(settings.otel_sample_ratio)))
        if settings.otel_exporter == "console":
            self.provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif settings.otel_exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            endpoint = settings.otel_endpoint or None  # None: OTEL_EXPORTER_OTLP_* or :4318
            self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint)))
        for p in processors:  # tests: an in-memory exporter
            self.provider.add_span_processor(p)
        self.tracer = self.provider.get_tracer("nextchar")
        self._propagator = TraceContextTextMapPropagator()
        self._server_kind = trace.SpanKind.SERVER

    # -- on the event loop -------------------------------------------------------------------
    def start_call(self, method: str, protocol: str, traceparent: str | None) -> CallTrace:
        parent = self._propagator.extract({"traceparent": traceparent}) if traceparent else None
        span = self.tracer.start_span(method.lstrip("/"), context=parent, kind=self._server_kind,
                                      attributes=_call_attributes(method, protocol))
        call = CallTrace(span, None, http=protocol == "http")
        ctx = self._trace.set_span_in_context(span)
        call.token = self._context.attach(ctx)
        _current.set(call)
        return call

    def end_call(self, call: CallTrace | None, code: str) -> None:
        if call is None:
            return
        span = call.span
        now = time.time_ns()
        if call.last_model_end_ns and span.is_recording():
            send = self.tracer.start_span("nextchar.send", context=self._trace.set_span_in_context(
                span), start_time=call.last_model_end_ns)
            send.end(end_time=now)
        if call.http:
            span.set_attribute("http.response.status_code", int(code))
        else:
            number = int(code) if code.isdigit() else _GRPC_CODES.get(code, 2)  # 2: UNKNOWN
            span.set_attribute("rpc.grpc.status_code", number)
        # gRPC: any code but OK is an error; HTTP: 5xx (OpenTelemetry's server-span rule).
        if (int(code) >= 500) if call.http else code not in ("OK", "0"):
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR, code))
        span.end(end_time=now)
        _current.set(None)
        try:
            self._context.detach(call.token)
        except ValueError:  # ended from another context (a cancelled stream): nothing to undo
            pass

    @staticmethod
    def current_call() -> CallTrace | None:
        """The traced call this coroutine serves, if it is sampled (the batcher's submit)."""
        call = _current.get()
        return call if call is not None and call.span.is_recording() else None

    # -- on a worker thread ------------------------------------------------------------------
    def model_call(self, items: Sequence[Any], started_ns: int, ended_ns: int) -> None:
        """Queue and model spans for the traced calls among one model call's items."""
        calls: dict[int, tuple[CallTrace, list[Any]]] = {}
        for it in items:
            if it.trace is not None:
                calls.setdefault(id(it.trace), (it.trace, []))[1].append(it)
        if not calls:
            return
        batch_id = next(_batch_ids)
        from opentelemetry.trace import Link

        contexts = {k: c.span.get_span_context() for k, (c, _) in calls.items()}
        for key, (call, its) in calls.items():
            parent = self._trace.set_span_in_context(call.span)
            queue = self.tracer.start_span("nextchar.queue", context=parent,
                                           start_time=min(it.enqueued_ns for it in its),
                                           attributes={"nextchar.texts": len(its)})
            queue.end(end_time=started_ns)
            model = self.tracer.start_span(
                "nextchar.model", context=parent, start_time=started_ns,
                links=[Link(ctx) for k, ctx in contexts.items() if k != key],
                attributes={"nextchar.batch.id": batch_id, "nextchar.batch.texts": len(items),
                            "nextchar.batch.requests": len(calls), "nextchar.texts": len(its)})
            model.end(end_time=ended_ns)
            call.last_model_end_ns = max(call.last_model_end_ns, ended_ns)

    def shutdown(self) -> None:
        self.provider.shutdown()
