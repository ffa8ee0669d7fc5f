"""The kernel's token-bucket filter (`tc tbf`) on a private network namespace's
loopback, and the time a message takes through it: bench_link.py's shaped
link, checked by tests/serving/test_serving.py. Benchmark tooling, not the package's:
it needs root, `unshare`, `ip` and `tc`.
"""

import os
import re
import shutil
import subprocess

import numpy as np


def transmit_s(nbytes, rate_bps: float, burst: int = 0):
  """Seconds to send messages of ``nbytes`` link bytes at ``rate_bps`` from a
  full token bucket of ``burst`` bytes, which pass at once (0: `serving.meter.Link`'s
  pacer, which serialises every byte)."""
  return np.maximum(0.0, np.asarray(nbytes, float) - burst) * 8 / rate_bps


def tbf_available() -> bool:
  """Whether this process may shape a private namespace's loopback: root,
  `unshare`, `ip` and `tc` with the tbf qdisc (tried in a throwaway namespace)."""
  if os.geteuid() != 0 or not all(shutil.which(t) for t in ("unshare", "tc", "ip")):
    return False
  return subprocess.run(["unshare", "--net", "tc", *TbfLoopback.qdisc(8e6)],
                        capture_output=True).returncode == 0


class TbfLoopback:
  """The kernel's token-bucket filter (`tc tbf`) on the loopback interface of
  the private network namespace this process runs in (`unshare --net`),
  which it brings up with an Ethernet MTU of 1,500 bytes. Every loopback
  packet passes it, both directions and TCP's ACKs, so keep one TCP hop on
  it (a relay reaches the server over a Unix socket). The bucket holds one
  packet: a message of b bytes then takes (b - BURST) / rate
  (`transmit_s`), 12 ms less than b / rate at 1 Mb/s.
  """
  BURST = 1600

  def __init__(self):
    subprocess.run(["ip", "link", "set", "lo", "up", "mtu", "1500"], check=True,
                   capture_output=True)

  @classmethod
  def qdisc(cls, rate_bps: float) -> list[str]:
    """The `tc` arguments that put this shaper on (or replace it on) ``lo``."""
    return ["qdisc", "replace", "dev", "lo", "root", "tbf", "rate", f"{rate_bps:.0f}bit",
            "burst", str(cls.BURST), "limit", "1000000"]

  def set(self, rate_bps: float) -> None:
    _tc(*self.qdisc(rate_bps))

  def clear(self) -> None:
    subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True)

  @staticmethod
  def sent_bytes() -> int:
    """Bytes the qdisc has sent: IP and TCP headers and ACKs included."""
    return int(re.search(r"Sent (\d+) bytes", _tc("-s", "qdisc", "show", "dev", "lo")).group(1))


def _tc(*args) -> str:
  return subprocess.run(["tc", *args], check=True, capture_output=True, text=True).stdout
