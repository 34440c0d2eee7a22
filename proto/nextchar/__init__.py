"""nextchar: serve character-level recurrent models over gRPC.

The import package is assembled from the repository's top-level folders (see pyproject.toml):
`nextchar.client` (client/), `nextchar.server` (server/), `nextchar.training` (training/), and
the generated protobuf modules `nextchar.v1` beside their .proto files here in proto/.
"""

__version__ = "0.1.0"
