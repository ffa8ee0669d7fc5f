"""The edge's side of the link to `rcst serve`: the gRPC `client` (named
errors, every answer's weights checked), its capped `retry`, the `protocol`
both sides agree on, the generated messages (`rcst_pb2`, from `rcst.proto`)
and `meter`, a loopback relay that counts the link's bytes when asked."""
