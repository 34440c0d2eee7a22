"""One settings object per server process: CLI flags override `NEXTCHAR_*` environment variables.

    NEXTCHAR_MODEL=artifacts/demo NEXTCHAR_PORT=50051 nextchar serve
    nextchar serve --model artifacts/demo --backend torchscript --port 0
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NEXTCHAR_", extra="ignore")

    model: Path = Field(Path("artifacts/demo"), description="Artifact directory to serve.")
    backend: Literal["onnx", "torchscript"] = Field(
        "onnx", description="Runtime: onnx (ONNX Runtime, no torch needed) or torchscript."
    )
    device: Literal["cpu", "cuda", "auto"] = Field(
        "auto", description="cuda fails at start when CUDA is absent; auto takes CUDA when present."
    )
    host: str = Field("127.0.0.1", description="Bind address; containers set 0.0.0.0.")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")

    # Limits, advertised by GetModelInfo and enforced.
    max_texts_per_request: int = Field(1024, ge=1, description="Texts in one Predict.")
    max_chars_per_text: int = Field(4096, ge=1, description="Characters in one text.")
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="gRPC message cap, both ways.")
    max_top_k: int = Field(64, ge=1, description="Largest top_k a caller may ask for.")
    default_top_k: int = Field(5, ge=1, description="top_k when the request leaves it 0.")

    # Batching.
    batching: bool = Field(True, description="Merge concurrent requests into shared model calls.")
    max_batch_size: int = Field(256, ge=1, description="Texts per model call.")
    max_batch_chars: int = Field(65536, ge=1, description="Padded characters (B*T) per model call.")
    max_batch_delay_ms: float = Field(
        0.0, ge=0, description="Extra wait to fill a batch; 0 = greedy (take what is queued)."
    )
    max_queue_texts: int = Field(
        8192, ge=1, description="Texts waiting for the model; beyond it RESOURCE_EXHAUSTED."
    )
    backend_workers: int = Field(
        0, ge=0, description="Concurrent model calls; 0 = the backend's own choice."
    )
    intra_op_threads: int = Field(
        0, ge=0, description="Threads inside one model call; 0 = the backend's own choice."
    )

    grace_s: float = Field(10.0, ge=0, description="On SIGTERM: time for accepted work to finish.")
    warmup: bool = Field(True, description="Run the model once before reporting SERVING.")
    log_level: str = Field("INFO", description="Python logging level.")
