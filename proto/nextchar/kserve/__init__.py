"""Generated modules for the KServe V2 / Open Inference Protocol (`package inference`).

`grpc_predict_v2_pb2` and `grpc_predict_v2_pb2_grpc` come from `make proto`; the servicer that
implements the service is `nextchar.server.kserve`.
"""
