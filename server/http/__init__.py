"""The HTTP front ends: thin adapters from JSON to the data plane (../dataplane.py), served by
uvicorn on the gRPC server's own event loop (server.py), one port (`--http-port`, default 8000).

app.py builds the ASGI app; middleware.py is every call's outer layer (request id, drain gate,
call tracking and metrics, bearer tokens, body size, deadline); errors.py maps domain errors to
each protocol's error body. Routes: v2.py + v2_codec.py (KServe V2 REST), openai.py +
openai_schemas.py (OpenAI-compatible /v1/completions), native.py (nextchar.v1 as JSON:
predict with top-k, per-position argmax and states; generate with a state). docs/http.md says
which endpoint does what. No adapter imports another, nor a gRPC front end.
"""
