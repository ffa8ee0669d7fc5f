"""`rcst serve`: the server side of the edge-server link (`service`: gRPC with
dynamic batching from `batcher`). The client, the protocol and the messages
are JAX-free and live in rcst_edge.link.

Needs the [serve] extra (grpcio, grpcio-health-checking); only the command
line's `serve` module imports this package, and only when it runs.
"""
