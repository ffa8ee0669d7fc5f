"""How the edge retries `rcst serve`: bounded in count and in time, and a
server found down is remembered for a while.

A call is retried at most ``retries`` times, after base x 2^attempt seconds
capped at ``cap_s``, with equal jitter (half fixed, half random), so that
clients which lost the same server do not come back in step. It never runs
past ``budget_s`` from its start. A call that still fails marks the server
down for ``down_for_s``: calls meanwhile fail at once, so the edge's answer
stands without a wait per image, and the first call after that tries again.
"""

from __future__ import annotations

import dataclasses
import math
import random
import threading
import time

from rcst_edge import errors

MAX_RETRIES = 10


@dataclasses.dataclass(frozen=True)
class Retry:
  retries: int = 3          # attempts after the first
  backoff_s: float = 0.25   # the first pause; doubled after each attempt...
  cap_s: float = 2.0        # ...up to this
  budget_s: float = 20.0    # a call's attempts and pauses together, at most
  down_for_s: float = 30.0  # a server found down is not called for this long (0: never)
  seed: int | None = None   # the jitter's (tests); None: seeded by the OS

  def __post_init__(self):
    if isinstance(self.retries, bool) or not isinstance(self.retries, int) \
        or not 0 <= self.retries <= MAX_RETRIES:
      raise errors.ConfigError(f"retries must be an integer in 0..{MAX_RETRIES}, "
                               f"got {self.retries!r}")
    for name, low in (("backoff_s", 0.0), ("cap_s", 0.0), ("budget_s", None),
                      ("down_for_s", 0.0)):
      v = getattr(self, name)
      if not math.isfinite(v) or (v < low if low is not None else v <= 0):
        raise errors.ConfigError(f"{name} must be a finite number "
                                 f"{'>= 0' if low is not None else '> 0'}, got {v!r}")

  def rng(self) -> random.Random:
    """The jitter's generator (one per client)."""
    return random.Random(self.seed)

  def pause(self, attempt: int, rng: random.Random) -> float:
    """Seconds to wait after failed attempt ``attempt`` (0 first) of a call."""
    full = min(self.cap_s, self.backoff_s * 2 ** min(attempt, 62))
    return full / 2 + rng.uniform(0, full / 2)


class DownMemory:
  """When a server was last found down, and why: `why` answers while that
  was less than ``down_for_s`` ago."""

  def __init__(self, down_for_s: float, clock=time.monotonic):
    self.down_for_s, self._clock = down_for_s, clock
    self._lock = threading.Lock()
    self._since: float | None = None
    self._reason = ""

  def mark(self, reason: str) -> None:
    if self.down_for_s > 0:
      with self._lock:
        self._since, self._reason = self._clock(), reason

  def clear(self) -> None:
    with self._lock:
      self._since = None

  def why(self) -> str | None:
    """Why calls fail at once now (with the time left), or None."""
    with self._lock:
      if self._since is None:
        return None
      left = self._since + self.down_for_s - self._clock()
      if left <= 0:
        self._since = None
        return None
      return f"{self._reason}; found down {self.down_for_s - left:.1f} s ago, not called " \
             f"again for {left:.1f} s"
