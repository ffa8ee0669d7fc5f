"""How each method is shown, keyed by its name in inference/methods.py.

The name in Table 1 and Figure 1, the short name in Table 2 and Figure 2, its
colour and marker in the figures. Kept out of `methods.Method`, which holds
only what decides, so that changing a label can change no number.
"""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Style:
  display: str             # Table 1 / Figure 1
  short: str               # Table 2 / Figure 2
  color: str
  marker: Optional[str]    # None: a reference row, drawn as a line


# In the table order of methods.ALL_METHODS.
STYLES = {
    "random": Style("Random", "Random", "tab:gray", "s"),
    "topk": Style("Top-K", "Top-K", "tab:blue", "^"),
    "attention_sum": Style("Attention Sum", "Att-Sum", "tab:green", "D"),
    "proposed": Style("Proposed", "Proposed", "tab:red", "o"),
    "certified": Style("Certified (LTT)", "Certified", "tab:orange", "*"),
    "server_only": Style("Server-only", "Server-only", "black", None),
    "edge_only": Style("Edge-only", "Edge-only", "tab:purple", None),
}
DISPLAY_NAMES = {name: s.display for name, s in STYLES.items()}
SHORT_NAMES = {name: s.short for name, s in STYLES.items()}
COLORS = {name: s.color for name, s in STYLES.items()}
MARKERS = {name: s.marker for name, s in STYLES.items() if s.marker}
