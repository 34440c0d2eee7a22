"""Numbers the client checks values against, in a module that imports nothing: `nextchar`
reads them before grpc loads (about 0.2 s), so a Ctrl-C that early still ends quietly."""

DEFAULT_PORT = 50051
UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
# gRPC holds a deadline as int64 nanoseconds since 1970, which end near 9.2e9 s: a longer
# timeout wraps and fails DEADLINE_EXCEEDED at once. 1e9 s (31 years) is "no deadline" enough.
MAX_TIMEOUT_S = 1e9
# The largest float32: GenerateRequest.temperature is a float, so a larger value cannot travel.
FLOAT32_MAX = 3.4028234663852886e38
# Bounds on GenerateRequest.stop: the server enforces them, the CLI checks them first.
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 64
