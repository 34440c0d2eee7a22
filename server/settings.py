"""One settings object per server process: CLI flags override `NEXTCHAR_*` environment variables.

    NEXTCHAR_MODEL=artifacts/demo NEXTCHAR_PORT=50051 nextchar serve
    nextchar serve --model artifacts/demo --backend torchscript --port 0
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

from .backends import BackendName


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def host_port(host: str, port: int) -> str:
    """`host:port` as gRPC targets and URLs write it: an IPv6 address in brackets ([::1]:50051)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ServerSettings(BaseSettings):
    # Compose and Kubernetes blank a variable (`NEXTCHAR_METRICS_PORT=`) to unset it.
    model_config = SettingsConfigDict(env_prefix="NEXTCHAR_", extra="ignore",
                                      env_ignore_empty=True)

    model: Path = Field(Path("runs/demo/artifact"), description="Artifact directory to serve (`make demo` writes runs/demo/artifact).")
    model_repository: Path | None = Field(
        None, description="Serve every DIR/<model>/ of this repository (each an artifact or "
        "<version>/ artifacts, optional config.json); with --model too, that one is the default.",
    )
    default_model: str = Field(
        "", description="The model requests with an empty model name go to (default: --model's, "
        "or the repository's only model).",
    )
    strict_readiness: bool = Field(
        True, description="Server ready only when every model that should be loaded is; off: "
        "when any is.",
    )
    backend: BackendName = Field(
        "onnx", description="Runtime: onnx (ONNX Runtime, no torch needed) or torchscript."
    )
    device: Literal["cpu", "cuda", "auto"] = Field(
        "auto", description="cuda fails at start when CUDA is absent; auto takes CUDA when present."
    )
    onnx_graph: Literal["auto", "loop", "standard"] = Field(
        "auto",
        description="onnx backend graph: loop (CPU-fast, folded embedding), standard (ORT's "
        "RNN kernels; cuDNN on CUDA); auto = loop on CPU when the artifact has it.",
    )
    host: str = Field("127.0.0.1", description="Bind address (IPv6 as ::1 or [::1]); "
                      "containers set 0.0.0.0.")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    http: bool = Field(
        True, description="Serve HTTP on --http-port too (KServe V2 REST, OpenAI-compatible "
        "/v1/completions, nextchar JSON; docs/http.md), same host, TLS and tokens as gRPC.")
    http_port: int = Field(8000, ge=0, le=65535, description="HTTP port; 0 picks a free one.")
    http_body_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="An HTTP request body that sends nothing for this "
        "long is refused with 408 (a client that stalls mid-body holds a connection and a call "
        "slot until then).")

    # Limits, advertised by GetModelInfo and enforced.
    max_texts_per_request: int = Field(1024, ge=1, description="Texts in one Predict.")
    max_chars_per_request: int = Field(
        262144, ge=1, description="Characters in one request, all texts together: no one call "
        "holds the model for seconds (a batch job splits its work into many requests).")
    max_chars_per_text: int = Field(4096, ge=1, description="Characters in one text.")
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="gRPC message cap, both ways.")
    max_top_k: int = Field(64, ge=1, description="Largest top_k a caller may ask for.")
    default_top_k: int = Field(5, ge=1, description="top_k when the request leaves it 0.")

    # Batching.
    batching: bool = Field(True, description="Merge concurrent requests into shared model calls.")
    max_batch_size: int = Field(256, ge=1, description="Texts per model call.")
    max_batch_chars: int = Field(65536, ge=1, description="Padded characters (B*T) per model call.")
    # Upper bounds on waits: a delay of `inf` or 1e9 ms would start and report SERVING, then
    # answer every call DEADLINE_EXCEEDED.
    max_batch_delay_ms: float = Field(
        0.0, ge=0, le=10_000, description="Extra wait to fill a batch; 0 = greedy (take what is queued)."
    )
    max_queue_texts: int = Field(
        8192, ge=1, description="High-priority texts waiting for the model; beyond it "
        "RESOURCE_EXHAUSTED."
    )
    max_queue_chars: int = Field(
        1 << 20, ge=1, description="Characters waiting per priority lane; beyond it "
        "RESOURCE_EXHAUSTED (bounds the queue's compute, not just its text count)."
    )
    low_max_queue_texts: int = Field(
        65536, ge=1, description="Low-priority (batch job) texts waiting; beyond it "
        "RESOURCE_EXHAUSTED."
    )
    high_timeout_s: float = Field(
        0.0, ge=0, le=86_400, description="High lane: a text without a deadline waits at most this long "
        "in the queue (DEADLINE_EXCEEDED); 0 = no limit."
    )
    low_max_batch_size: int = Field(
        32, ge=0, description="Low lane: texts per model call; 0 = --max-batch-size. Smaller "
        "batch-job calls hold the GIL and the event loop for less at a time."
    )
    low_timeout_s: float = Field(
        0.0, ge=0, le=86_400, description="Low lane: the same queue timeout for batch-job texts; 0 = none."
    )
    low_lane_workers: int = Field(
        0, ge=0, description="Concurrent model calls low-priority batches may use while "
        "interactive calls come in; 0 = all but one when the backend has several (the rest stays "
        "free for them); with none for 0.5 s, every worker."
    )
    low_lane_nice: int = Field(
        19, ge=0, le=19, description="Low-priority model calls run on threads this much nicer "
        "(OS priority, Linux) than the event loop (19: the lowest), so interactive calls get "
        "the cores first; 0 = off. With several backend workers only."
    )
    worker_nice: int = Field(
        5, ge=0, le=19, description="Model calls and Generate steps run on threads this much "
        "nicer (OS priority, Linux) than the event loop, so accepting calls and sending answers "
        "get a core first where the cores are fewer than the busy threads; 0 = off."
    )
    parallel_batch_chars: int = Field(
        4096, ge=0,
        description="While one model call runs, start another only once this many characters "
        "are queued; less waits for the running call and joins one bigger batch. 0 = greedy.",
    )
    # Upper bounds: each worker is a thread (and a session's arena); thousands of them starve
    # the process of the CPU its signal handling needs.
    backend_workers: int = Field(
        0, ge=0, le=256, description="Concurrent model calls; 0 = the backend's own choice."
    )
    intra_op_threads: int = Field(
        0, ge=0, le=256, description="Threads inside one model call; 0 = the backend's own choice."
    )

    # Streaming generation (docs/streaming.md).
    max_streams: int = Field(
        256, ge=1, description="Generate streams active at once; beyond it RESOURCE_EXHAUSTED."
    )
    step_batching: bool = Field(
        True, description="Advance all Generate streams in one model call per step (off: one call per stream per step)."
    )
    generate_flush_ms: float = Field(
        20.0, ge=0, le=600_000, description="Generate sends a stream's new text at most this often (first and last at once); 0: every step."
    )
    generate_max_messages_per_s: float = Field(
        1000.0, ge=0, le=1e9, description="Generate's messages per second, all streams together, "
        "that the flush interval keeps under: with more streams open than generate_flush_ms "
        "allows for, a stream's messages come (open streams / this) seconds apart; 0: no cap."
    )
    generate_prefill_wait_ms: float = Field(
        50.0, ge=0, le=10_000, description="While at least as many prompts of new Generate streams are "
        "queued or in a model call as the next step would advance streams (a burst of new "
        "streams), the step waits for them up to this long, so the burst gets its first "
        "characters sooner where the cores are few; 0: steps never wait."
    )

    max_connection_age_s: float = Field(
        0.0, ge=0, le=30 * 86_400, description="Close each gRPC client connection after about "
        "this long (a GOAWAY; the client reconnects, re-resolving dns:/// names), so replicas "
        "an autoscaler adds get long-lived clients' calls too; 0 = never.")
    max_connection_age_grace_s: float = Field(
        300.0, ge=0, le=86_400, description="Once a connection is past --max-connection-age-s: "
        "how long its calls in flight (a long Generate stream) may go on before it is closed.")
    http2_bdp_probe: bool = Field(
        False, description="HTTP/2 bandwidth-delay probing: PINGs that grow flow-control "
        "windows, for big messages on long links; off (as every recorded benchmark ran), no "
        "PING frames per burst of small calls (docs/benchmarks.md)."
    )
    grace_s: float = Field(10.0, ge=0, le=86_400, description="On SIGTERM: time for accepted work to finish.")
    event_loop: Literal["auto", "asyncio", "uvloop"] = Field(
        "auto", description="asyncio event loop: uvloop (faster per request) or the standard "
        "one; auto = uvloop when installed."
    )
    gil_switch_interval_ms: float = Field(
        5.0, gt=0, le=1000, description="How long a Python thread may hold the GIL while another "
        "waits (sys.setswitchinterval); Python's default is 5 ms."
    )
    warmup: bool = Field(True, description="Run the model once before reporting SERVING.")
    log_level: str = Field("INFO", description="Python logging level.")

    # Operations (docs/reliability.md): metrics, logs, drain, hot reload.
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Prometheus /metrics HTTP port; 0 picks a free one; unset = off."
    )
    metrics_host: str = Field(
        "127.0.0.1", description="Bind address of /metrics (unauthenticated: loopback unless "
        "set; containers set 0.0.0.0 for their scraper)."
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as text or one JSON object per line (with request_id)."
    )
    access_log: bool = Field(
        False, description="Log every call at INFO (nextchar.server.access: method, code, "
        "duration, request id, a refused call's message); off: at DEBUG only."
    )
    prestop_s: float = Field(
        0.0, ge=0, le=86_400, description="On SIGTERM: keep serving this long after health turns NOT_SERVING."
    )
    poll_s: float = Field(
        0.0, ge=0, le=86_400, description="Check a model repository for a newer version every "
        "poll_s (0.01 s at least: each poll reads the repository); 0 = off."
    )

    # Tracing (docs/tracing.md): OpenTelemetry, needs `pip install 'nextchar[otel]'`.
    otel: bool = Field(False, description="OpenTelemetry spans for every call (receive, queue, "
                       "model call, send), from the caller's traceparent.")
    otel_exporter: Literal["otlp", "console", "none"] = Field(
        "otlp", description="Where spans go: OTLP over HTTP, the console, or nowhere (none).")
    otel_endpoint: str = Field(
        "", description="OTLP/HTTP traces URL; empty: OTEL_EXPORTER_OTLP_* or localhost:4318.")
    otel_sample_ratio: float = Field(
        1.0, ge=0, le=1, description="Share of new traces sampled (a caller's sampled flag wins).")
    otel_service_name: str = Field("nextchar", description="The service.name of the spans.")

    # Security (README "Operations and security"): TLS, mTLS, bearer tokens.
    tls_cert: Path | None = Field(None, description="PEM server certificate (chain); enables TLS.")
    tls_key: Path | None = Field(None, description="PEM private key of --tls-cert.")
    tls_client_ca: Path | None = Field(
        None, description="PEM CA bundle that verifies client certificates (mTLS; with "
        "--tls-require-client-cert)."
    )
    tls_require_client_cert: bool = Field(
        False, description="Refuse TLS clients without a certificate from --tls-client-ca."
    )
    auth_tokens_file: Path | None = Field(
        None, description="File of accepted bearer tokens, one per line ('#' comments)."
    )
    auth_tokens: str = Field(
        "", description="Comma-separated bearer tokens (env NEXTCHAR_AUTH_TOKENS only, no flag)."
    )
    admin_tokens_file: Path | None = Field(
        None, description="File of bearer tokens that alone may change what is served (Admin, "
        "repository load/unload); accepted for every other call too. Turns auth on."
    )
    auth_open_health: bool = Field(True, description="With auth on, health checks need no token.")
    auth_open_reflection: bool = Field(
        False, description="With auth on, server reflection needs no token."
    )

    @field_validator("host", "metrics_host")
    @classmethod
    def _bare_address(cls, host: str) -> str:
        """`[::1]` as well as `::1`: kept bare, since sockets and uvicorn take the address alone
        and `host_port` adds the brackets where gRPC and URLs need them."""
        if not (host.startswith("[") and host.endswith("]")):
            return host
        try:
            return str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError:
            raise PydanticCustomError(  # its text alone, without pydantic's "Value error, "
                "ipv6_brackets", "{host}: brackets hold an IPv6 address, e.g. [::1]",
                {"host": host}) from None

    @field_validator("poll_s")
    @classmethod
    def _poll_period(cls, poll_s: float) -> float:
        """0 is off; a period of microseconds re-reads the repository back to back (half a core
        of stat calls on an idle server)."""
        if 0 < poll_s < 0.01:
            raise PydanticCustomError(
                "poll_too_often", "{poll_s}: poll at most every 0.01 s (0 turns polling off)",
                {"poll_s": poll_s})
        return poll_s
