"""The edge-server link: `rcst serve` (`service`: gRPC with dynamic batching
from `batcher`), the networked edge's `client`, the `protocol` both agree on,
and `meter`, a loopback relay that counts the link's bytes when asked.

Needs the [serve] extra (grpcio, grpcio-health-checking); only the command
line's `serve` module imports this package, and only when it runs.
"""
