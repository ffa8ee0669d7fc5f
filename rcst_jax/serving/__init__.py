"""The edge-server link: `rcst serve` (a gRPC server with dynamic batching),
the networked edge's client, and a metered, shapeable loopback link.

Needs the [serve] extra (grpcio, grpcio-health-checking); nothing else in
rcst_jax imports this package.
"""
