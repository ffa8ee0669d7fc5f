"""JAX's persistent compilation cache for the `rcst` command, on by default.

Every run compiles the same few dozen programs (server buckets, edge step,
softmax); kept on disk, a second run loads them instead (about 25-35 s of a
demo on 2 cores). The directory is per CPU model and flags and per jax
version, because XLA:CPU code is built for the host's instruction set: a
cache copied to another kind of machine is not reused. A loaded program is
the program that was compiled, so results are the same.
"""

from __future__ import annotations

import hashlib
import os
import platform

ENV = "RCST_COMPILATION_CACHE"  # a directory, or "0" / "off" to disable


def _host_key() -> str:
  """CPU model and flags, jax/jaxlib versions and XLA_FLAGS, hashed."""
  import jax
  import jaxlib
  cpu = ""
  try:
    with open("/proc/cpuinfo") as f:
      lines = f.read(1 << 16).splitlines()
    cpu = "\n".join(sorted({l for l in lines if l.startswith(("model name", "flags"))}))
  except OSError:
    cpu = platform.processor()
  text = "\n".join([cpu, platform.machine(), jax.__version__, jaxlib.__version__,
                    os.environ.get("XLA_FLAGS", "")])
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "rcst_jax", "xla")


def enable() -> str | None:
  """Points JAX at the cache (call after `xla_cpu.tune`, before any
  computation); returns the directory, or None when RCST_COMPILATION_CACHE
  turns it off or the directory cannot be made."""
  setting = os.environ.get(ENV, "")
  if setting.lower() in ("0", "off", "false", "no"):
    return None
  import jax
  path = os.path.join(setting or default_dir(), _host_key())
  try:
    os.makedirs(path, exist_ok=True)
  except OSError:
    return None  # a read-only home: run without the cache rather than fail
  jax.config.update("jax_compilation_cache_dir", path)
  # Every program, however quick to compile: the demo's are many and small.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
