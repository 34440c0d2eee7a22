"""Where training runs and in which precision: `--device auto|cpu|cuda`, `--precision`.

    device = resolve_device("auto", local_rank=0)      # cuda:0 when CUDA is there, else cpu
    dtype = resolve_precision("auto", device)          # None (float32), bfloat16 or float16

Weights and optimizer state are float32 on every device; autocast runs the training steps in
the lower precision. Checkpoints are written from CPU copies, so a run trained on a GPU exports
and resumes on a CPU-only machine and the other way round.
"""

from __future__ import annotations

import torch

from .errors import TrainingError


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if requested == "cuda" and not available:
        built = "with" if torch.backends.cuda.is_built() else "without"
        raise TrainingError(f"--device cuda: no CUDA device is available (torch "
                            f"{torch.__version__}, built {built} CUDA); use --device cpu")
    if available:
        # cuDNN's fused RNN kernels are what nn.LSTM/GRU call on CUDA; benchmark mode picks
        # the fastest algorithm for the (fixed) batch shape once.
        torch.backends.cudnn.enabled = True
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def cpu_bf16_supported() -> bool:
    """oneDNN's bf16 LSTM needs AVX512-BF16/AMX (or AVX512 core): without it autocast fails
    inside the LSTM ("could not create a primitive descriptor"), so auto falls back to fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(requested: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain float32."""
    if requested == "fp32":
        return None
    if requested == "bf16":
        if device.type == "cpu" and not cpu_bf16_supported():
            raise TrainingError("--precision bf16: this CPU has no bf16 support in oneDNN "
                                "(needs AVX512); use --precision fp32 or auto")
        return torch.bfloat16
    if requested == "fp16":
        if device.type == "cpu":  # oneDNN has no fp16 LSTM kernel ("could not create a primitive")
            raise TrainingError("--precision fp16 is for CUDA: on the CPU use --precision bf16 "
                                "(CPUs with AVX512-BF16), fp32 or auto")
        return torch.float16
    # auto
    if device.type == "cuda":
        # fp16 + loss scaling is cuDNN's most-trodden RNN path on every GPU generation.
        return torch.float16
    return torch.bfloat16 if cpu_bf16_supported() else None


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
