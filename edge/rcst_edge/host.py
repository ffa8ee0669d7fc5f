"""The host this process runs on: how many CPU cores it may use."""

from __future__ import annotations

import os


def cores() -> int:
  """CPU cores this process may run on (its affinity mask where the OS has one)."""
  n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return max(1, n or 1)
