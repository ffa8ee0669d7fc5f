"""Expected failures, and how the command line reports them.

An expected failure is one the user can act on: a bad file, a refused output
path, a full disk. ``rcst`` prints it as ``rcst <cmd>: error: <what and
where>`` and exits with 2. Anything else is a bug and keeps its traceback.
Every error class of the package derives from ``RcstError`` (a ValueError, so
callers that caught ValueError before still do).
"""

from __future__ import annotations

import errno


class RcstError(ValueError):
  """An expected failure; the message says what went wrong and where."""


class ConfigError(RcstError):
  """A setting (preprocessing, label map, metadata value) is out of its domain."""


class OutputRefusedError(RcstError):
  """An output path that we refuse to write or replace (it is not ours to destroy)."""


class ServerUnreachable(RcstError):
  """A remote server gave no answer within its deadline after every retry."""


class ServerOtherWeights(RcstError):
  """A remote server answered from other weights than the calibration was
  made for: its answer is not used."""


# Operating-system failures a user can fix (path, permission, disk), not bugs.
_OS_TYPES = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
             PermissionError)
_OS_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.ENAMETOOLONG, errno.EACCES,
              errno.EPERM, errno.ELOOP}


def is_expected(e: BaseException) -> bool:
  """True for failures reported as one line; False for bugs (keep the traceback)."""
  if isinstance(e, RcstError):
    return True
  return isinstance(e, _OS_TYPES) or (isinstance(e, OSError) and e.errno in _OS_ERRNOS)


def describe(e: BaseException) -> str:
  """One line: the message of an RcstError, or 'what: where' for an OSError."""
  if isinstance(e, OSError) and not isinstance(e, RcstError) and e.strerror:
    where = e.filename if e.filename2 is None else f"{e.filename} -> {e.filename2}"
    return f"{e.strerror}: {where}" if where is not None else e.strerror
  return str(e) or type(e).__name__
