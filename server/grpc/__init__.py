"""The gRPC front ends: thin adapters from protobuf to the data plane (../dataplane.py).

nextchar_v1.py (nextchar.v1.NextChar), kserve.py + kserve_codec.py (KServe V2
inference.GRPCInferenceService), admin.py (nextchar.v1.Admin), wrapping.py (telemetry, auth and
error mapping around every handler). No adapter imports another.
"""
