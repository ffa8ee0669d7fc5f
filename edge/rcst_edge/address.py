"""HOST:PORT addresses of the edge-server link, parsed in one place.

The command line checks them in argparse (without gRPC, which is an extra)
and the link (`serving`) parses the same way, so `rcst serve --address` and
`rcst run --server` accept and refuse the same text.
"""

from __future__ import annotations

import re

from rcst_edge import errors

_ADDRESS = re.compile(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.\-]+):(\d{1,5})")


def parse_address(address: str, any_port: bool = False) -> tuple[str, int]:
  """(host, port) of HOST:PORT (an IPv6 host in brackets); ``any_port``:
  port 0 (a free one, for a server) is allowed."""
  m = _ADDRESS.fullmatch(address)
  lowest = 0 if any_port else 1
  if not m or not lowest <= int(m.group(2)) < 65536:
    ports = "0..65535, 0: any free port" if any_port else "1..65535"
    raise errors.RcstError(f"address must be HOST:PORT (port {ports}), got {address!r}")
  return m.group(1).strip("[]"), int(m.group(2))
