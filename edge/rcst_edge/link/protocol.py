"""What `rcst serve` and its client agree on beyond rcst.proto's messages: the
gRPC service's name, its methods with their request and reply messages, and
the largest reply and request. `service` and `client` both build their ends from here, so
neither imports the other (tests/serving/test_serving.py checks this against the proto).
"""

from __future__ import annotations

from rcst_edge.link import rcst_pb2 as pb

SERVICE = "rcst.v1.Server"  # rcst.proto's package.service

CLASSIFY, CLASSIFY_BATCH, DESCRIBE = "Classify", "ClassifyBatch", "Describe"

# method -> (request, reply) message classes, as rcst.proto declares them
METHODS = {
    CLASSIFY: (pb.ClassifyRequest, pb.ClassifyReply),
    CLASSIFY_BATCH: (pb.ClassifyBatchRequest, pb.ClassifyBatchReply),
    DESCRIBE: (pb.DescribeRequest, pb.DescribeReply),
}

# A reply is logits (4 bytes a class, per payload of a batch call) and a few
# numbers: 4 MiB is far over any, and both ends must allow it.
MAX_REPLY_BYTES = 1 << 22

# No server takes a request above this (`rcst serve --max-message-bytes`):
# 64 MiB is over 400 whole raw 224x224 images, far over any `ClassifyBatch`
# call (64 payloads), and below gRPC's own limit (2 GiB).
MAX_REQUEST_BYTES = 1 << 26


def path(method: str) -> str:
  """The HTTP/2 path a client calls ``method`` at."""
  return f"/{SERVICE}/{method}"
