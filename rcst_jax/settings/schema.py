"""One schema for the evaluation config, checked before any model is loaded.

`SCHEMA` maps each (dotted) config key to a checker: a function that returns
None for a good value, or a short phrase saying what is allowed. `RULES` hold
the few checks that read two keys at once. A key of the config that is not in
`SCHEMA` is refused (a typo must not silently leave a default in place).
Later issues add their keys here: one line each.

  validate(config)   # raises errors.ConfigError naming the key, value and rule
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Callable, Optional

from rcst_edge.errors import ConfigError

Checker = Callable[[Any], Optional[str]]

DATA_SOURCES = ("synthetic", "folder", "imagenet2012", "imagenet_v2", "imagenette")
GRADCAM_LAYERS = ("features", "conv_head")
MATMUL_PRECISIONS = ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32")

# Domains the schema checks; the modules that use them import them from here.
DTYPES = ("float32", "bfloat16")                 # models.loading
EMPTY_POLICIES = ("cls_only", "argmax", "edge")  # inference.selection


# --- checkers: value -> None (allowed) or what is allowed --------------------------------

def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def boolean(v):
  return None if isinstance(v, bool) else "True or False"


def integer(v):
  return None if _is_int(v) else "an integer"


def int_at_least(low: int) -> Checker:
  return lambda v: None if _is_int(v) and v >= low else f"an integer >= {low}"


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def positive(v):
  return None if _is_real(v) and math.isfinite(v) and v > 0 else "a finite number > 0"


def open_unit(v):
  return None if _is_real(v) and 0 < v < 1 else "a number in the open interval (0, 1)"


def in_range(low: float, high: float, note: str = "") -> Checker:
  """A finite number in the closed interval [low, high]."""
  want = f"a number in [{low:g}, {high:g}]{note}"
  return lambda v: None if _is_real(v) and low <= v <= high else want


# Saliency is min-max normalised to [0, 1]: a tau outside it is a slip (e.g. a percentage).
unit_interval = in_range(0, 1)
# p_max (lambda) and the cumulative CLS attention (delta_sum) lie in [0, 1]; a value just
# above 1 (1.01, despite rounding) means "accept nothing" / "keep every patch". All values
# above 1 mean the same, so one beyond 1.1 is far likelier a percentage than intended.
lambda_value = in_range(0, 1.1, " (one above 1 accepts nothing)")
delta_sum_value = in_range(0, 1.1, " (one above 1 keeps every patch)")


def one_of(*choices) -> Checker:
  return lambda v: None if isinstance(v, str) and v in choices else f"one of {list(choices)}"


def string(v):
  return None if isinstance(v, str) else "a string"


def non_empty_string(v):
  return None if isinstance(v, str) and v else "a non-empty string"


def optional(check: Checker) -> Checker:
  """None (an unset placeholder) or what `check` allows."""
  return lambda v: None if v is None else check(v)


def grid_of(item: Checker, min_len: int = 1, increasing: bool = False,
            distinct: bool = False) -> Checker:
  """A tuple/list of at least min_len items, each allowed by `item` (each once if distinct)."""
  def check(v):
    each = item(object())  # a checker's refusal of anything is its description
    want = f"a tuple of at least {min_len} value(s), each {each}"
    want += (", strictly increasing" if increasing else "") + (", none twice" if distinct else "")
    if not isinstance(v, (tuple, list)) or len(v) < min_len:
      return want
    bad = [x for x in v if item(x) is not None]
    if bad:
      return f"{want}; {bad[0]!r} is not"
    if increasing and any(a >= b for a, b in zip(v, v[1:])):
      return want
    again = [x for i, x in enumerate(v) if x in v[:i]]
    if distinct and again:
      return f"{want}; {again[0]!r} is given twice"
    return None
  return check


def codec_spec(v):
  from rcst_edge.payload import codecs  # noqa: PLC0415 (the codec table is the domain)
  try:
    codecs.parse(v)
    return None if isinstance(v, str) else "a codec name"
  except codecs.CodecError:
    return "a codec: raw, zstd, webp-lossless, jpeg:Q or jpeg420:Q (Q in 1..100)"


def codec_list(min_len: int) -> Checker:
  each = grid_of(codec_spec, min_len=min_len)

  def check(v):
    from rcst_edge.payload import codecs  # noqa: PLC0415
    why = each(v)
    if why is None:
      try:
        codecs.parse_grid(v)
      except codecs.CodecError:
        return "a list of codecs, none named twice"
    return why
  return check


def devices(v):
  if v == "all" or (_is_int(v) and v >= 1) or (isinstance(v, str) and v.isdigit() and int(v) >= 1):
    return None
  return "'all' or a positive integer"


def _dtypes():
  return DTYPES


def _empty_policies():
  return EMPTY_POLICIES


def dtype(v):
  return one_of(*_dtypes())(v)


def compare_dtype(v):
  return None if v == "" else one_of("", *_dtypes())(v)


def empty_policy(v):
  return one_of(*_empty_policies())(v)


# --- the schema --------------------------------------------------------------------------

SCHEMA: dict[str, Checker] = {
    # models
    "models_dir": non_empty_string,
    "edge": non_empty_string,
    "server": non_empty_string,
    "baseline_edge": non_empty_string,
    "edge_onnx": optional(non_empty_string),
    # data
    "data.name": one_of(*DATA_SOURCES),
    "data.data_dir": optional(string),
    "data.split": non_empty_string,
    "data.n_cal": positive_int,
    "data.n_test": positive_int,        # synthetic only (see RULES)
    "data.seed": integer,
    "data.split_seed": integer,
    "data.folder_root": optional(string),
    "data.label_map": optional(string),
    "data.pil_decode": boolean,
    "data.limit": non_negative_int,     # 0: the whole split
    # method (Algorithms 1 and 2) and baselines
    "alpha_crc": open_unit,
    "alpha_aps": open_unit,
    "eta": positive,
    "tau_grid": grid_of(unit_interval),
    "k_grid": grid_of(non_negative_int),      # <= number of patches: checked with the model
    "delta_sum_grid": grid_of(delta_sum_value),
    "empty_policy": empty_policy,
    "codec_grid": codec_list(min_len=1),
    "gradcam_layer": one_of(*GRADCAM_LAYERS),
    "seed": integer,
    # numerics and execution
    "dtype": dtype,
    "matmul_precision": one_of(*MATMUL_PRECISIONS),
    "compare_dtype": compare_dtype,
    "devices": devices,
    "multihost": boolean,
    "batch_size": positive_int,
    "server_batch": positive_int,
    "server_min_batch": non_negative_int,
    "server_token_budget": non_negative_int,
    "host_concurrency": non_negative_int,
    "chunk_size": positive_int,
    "buckets": grid_of(positive_int, increasing=True),
    # whole-system certification (Learn-then-Test, calibration/certificate.py)
    "certify.enabled": boolean,
    "certify.epsilon": open_unit,
    "certify.delta": open_unit,
    "certify.risks": grid_of(one_of("accuracy_drop", "degradation", "system_error", "edge_risk"),
                             distinct=True),
    "certify.test": one_of("wsr", "hb", "binomial", "exact"),
    "certify.lambda_grid": grid_of(lambda_value),
    "certify.split": open_unit,
    "certify.tau_grid": grid_of(unit_interval, min_len=0),
    "certify.codec_grid": codec_list(min_len=0),
    "certify.seed": integer,
    "certify.cost": one_of("patches", "bytes"),
    "certify.multiple_testing": one_of("pareto", "bonferroni"),
    # outputs
    "gallery_size": non_negative_int,
    "per_image": boolean,
    "output_dir": non_empty_string,
    "progress": boolean,
}


def _synthetic_needs_n_test(flat):
  if flat.get("data.name") == "synthetic" and "data.n_test" not in flat:
    return "data.n_test", None, "a positive integer when data.name is 'synthetic'"
  return None


def _folder_needs_root(flat):
  if flat.get("data.name") == "folder" and not flat.get("data.folder_root"):
    return "data.folder_root", flat.get("data.folder_root"), \
        "a directory of class folders when data.name is 'folder'"
  return None


def _codec_axis_needs_bytes(flat):
  if len(flat.get("certify.codec_grid") or ()) > 1 and flat.get("certify.cost") != "bytes":
    return "certify.cost", flat.get("certify.cost"), \
        "'bytes' when certify.codec_grid names several codecs (patches cannot tell them apart)"
  return None


def certify_split_sizes(n_cal: int, split: float) -> tuple[int, int]:
  """(fitting, testing) images of certify.split on n_cal calibration images: the one
  rule sweep/certification.py splits by (Python's round, half to even)."""
  n_fit = int(round(float(split) * int(n_cal)))
  return n_fit, int(n_cal) - n_fit


def _certify_split_leaves_both_parts(flat):
  if not flat.get("certify.enabled") or flat.get("certify.split") is None:
    return None
  n_cal, split = flat.get("data.n_cal"), flat["certify.split"]
  if n_cal is None:
    return None
  n_fit, n_test = certify_split_sizes(n_cal, split)
  if n_fit < 1 or n_test < 1:
    return "certify.split", split, (
        f"a fraction of data.n_cal = {n_cal} calibration images that leaves both parts "
        f"non-empty (it gives {n_fit} fitting and {n_test} testing images)")
  return None


def _binomial_needs_binary_risks(flat):
  if flat.get("certify.enabled") and flat.get("certify.test") == "binomial" \
      and "accuracy_drop" in (flat.get("certify.risks") or ()):
    return "certify.test", "binomial", ("'exact', 'wsr' or 'hb' when certify.risks has "
                                        "accuracy_drop (three-valued; binomial needs 0/1 losses)")
  return None


# Checks over several keys: flat config -> None or (key, value, what is allowed).
RULES: list[Callable[[dict], Optional[tuple]]] = [
    _synthetic_needs_n_test, _folder_needs_root, _codec_axis_needs_bytes,
    _certify_split_leaves_both_parts, _binomial_needs_binary_risks]


# --- validation --------------------------------------------------------------------------

def flatten(config, prefix: str = "") -> dict[str, Any]:
  """{"data.name": ..., "alpha_crc": ...}: nested ConfigDicts/dicts as dotted keys."""
  out = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if hasattr(value, "items") and f"{name}." in _PREFIXES:
      out.update(flatten(value, f"{name}."))
    else:
      out[name] = value
  return out


_PREFIXES = {k[:i + 1] for k in SCHEMA for i, c in enumerate(k) if c == "."}


def validate(config) -> None:
  """Raises ConfigError on the first unknown key or value out of its domain."""
  flat = flatten(config)
  unknown = sorted(k for k in flat if k not in SCHEMA)
  if unknown:
    key = unknown[0]
    close = difflib.get_close_matches(key, SCHEMA, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"unknown config key {key!r}{hint}")
  for key, value in flat.items():
    why = SCHEMA[key](value)
    if why is not None:
      raise ConfigError(f"config.{key} = {value!r}: must be {why}")
  for rule in RULES:
    bad = rule(flat)
    if bad is not None:
      key, value, why = bad
      raise ConfigError(f"config.{key} = {value!r}: must be {why}")
