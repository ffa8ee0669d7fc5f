"""The whole-file seal of a calibration artifact: which fields changed since rcst wrote it.

Every top-level field of calibration.json but the seal itself is sealed (thresholds,
alphas, B, transform, geometry, Grad-CAM layer, model digests, the certificate, the
reseal history, ...): one short digest per field, so a load names each field that
differs, and one sha256 over them all. Like the certificate's digest, it catches edits
and damage, not a forgery that recomputes it (`rcst calibrate --verify` catches that).

Format: {"method": "sha256", "fields": {name: 16 hex digits}, "digest": 64 hex digits}.
A field's digest hashes its name with its value (a value moved to another field is a
change); the digest hashes the canonical JSON (sorted keys, compact) of all sealed fields.
"""

from __future__ import annotations

import hashlib
import json

KEY = "seal"
METHOD = "sha256"
_FIELD_HEX = 16


def _canonical(value) -> str:
  return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False,
                    ensure_ascii=True)


def _sha256(value) -> str:
  return hashlib.sha256(_canonical(value).encode("ascii")).hexdigest()


def field_digest(name: str, value) -> str:
  return _sha256([name, value])[:_FIELD_HEX]


def make(body: dict) -> dict:
  """The seal of ``body`` (every field but the seal)."""
  body = {k: v for k, v in body.items() if k != KEY}
  return {"method": METHOD, "fields": {k: field_digest(k, v) for k, v in sorted(body.items())},
          "digest": _sha256(body)}


def well_formed(s) -> bool:
  return (isinstance(s, dict) and set(s) == {"method", "fields", "digest"}
          and s["method"] == METHOD and isinstance(s["digest"], str)
          and isinstance(s["fields"], dict)
          and all(isinstance(v, str) for v in s["fields"].values()))


def changed(body: dict, s) -> list[str] | None:
  """The fields of ``body`` that differ from seal ``s``, each with how
  ("lambda_hat (changed)", "x (added)", "y (removed)"); [] when it matches; None when
  ``s`` is not a well-formed seal. A seal whose own entries were edited (its digest
  no longer covers its fields) is reported as "seal (changed)"."""
  if not well_formed(s):
    return None
  body = {k: v for k, v in body.items() if k != KEY}
  want = s["fields"]
  if s["digest"] == _sha256(body):  # the fields match; only the seal's own entries may not
    return [] if make(body)["fields"] == want else [f"{KEY} (changed)"]
  diffs = [f"{k} (added)" for k in sorted(set(body) - set(want))]
  diffs += [f"{k} (removed)" for k in sorted(set(want) - set(body))]
  diffs += [f"{k} (changed)" for k in sorted(set(body) & set(want))
            if field_digest(k, body[k]) != want[k]]
  return diffs or [f"{KEY} (changed)"]


def names(diffs: list[str]) -> list[str]:
  """The field names of `changed`'s phrases."""
  return [d.split(" (", 1)[0] for d in diffs]


# ---------------------------------------------------------------------------
# The reseal history: `rcst calibrate --reseal` vouches for a deliberate edit.


HISTORY = "resealed"


def check_history(records) -> str | None:
  """None for a good history (null, or a non-empty list of {"at": UTC time, "fields":
  the names that changed, null when the file had no seal to compare}), else what is wrong."""
  if records is None:
    return None
  ok = isinstance(records, list) and records and all(
      isinstance(r, dict) and set(r) == {"at", "fields"} and isinstance(r["at"], str)
      and (r["fields"] is None or (isinstance(r["fields"], list)
                                   and all(isinstance(f, str) for f in r["fields"])))
      for r in records)
  return None if ok else (f"{HISTORY} must be null or a non-empty list of "
                          f"{{'at': time, 'fields': [names] or null}}, got {records!r}")


def history_warning(path, records: list) -> str:
  """The one line `rcst run` and `rcst explain` print for a resealed file."""
  last = records[-1]["at"]
  if any(r["fields"] is None for r in records):
    return (f"{path} was resealed by hand (last at {last}) from a file without a seal: rcst "
            "cannot tell which fields were edited, so no guarantee of the original "
            "calibration applies to any of them")
  fields = sorted({f for r in records for f in r["fields"]})
  return (f"{path} was edited by hand and resealed (last at {last}): no guarantee of the "
          f"original calibration applies to {', '.join(fields)}")

