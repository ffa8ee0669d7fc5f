"""Builds colab/rcst_imagenet.ipynb from its source, colab/rcst_imagenet.py.

The source is plain Python in the percent format (jupytext, VS Code,
Spyder): ``# %% id=NAME`` starts a code cell, ``# %% [markdown] id=NAME`` a
Markdown cell whose lines are comments. Linters and formatters see it as
code; the notebook is generated, never edited by hand:

  .venv/bin/python colab/build_notebook.py          # writes the .ipynb
  .venv/bin/python colab/build_notebook.py --check  # fails if it is stale
"""

import os
import re
import sys

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "rcst_imagenet.py")
NOTEBOOK = os.path.join(HERE, "rcst_imagenet.ipynb")
METADATA = {"accelerator": "TPU", "colab": {"name": "rcst_imagenet.ipynb", "provenance": []},
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"}}
_HEADER = re.compile(r"^# %%( \[markdown\])? id=([\w-]+)\s*$")


def parse(text: str):
  """[(kind, id, source)] from percent-format text."""
  cells, current = [], None
  for line in text.splitlines():
    m = _HEADER.match(line)
    if m:
      current = ["markdown" if m.group(1) else "code", m.group(2), []]
      cells.append(current)
    elif current is not None:
      current[2].append(line)
  out = []
  for kind, cid, lines in cells:
    while lines and not lines[-1].strip():
      lines.pop()
    if kind == "markdown":
      lines = [ln[2:] if ln.startswith("# ") else ln.lstrip("#") for ln in lines]
    out.append((kind, cid, "\n".join(lines)))
  return out


def build_notebook(source: str = SOURCE):
  with open(source, encoding="utf-8") as f:
    cells = parse(f.read())
  make = {"code": nbformat.v4.new_code_cell, "markdown": nbformat.v4.new_markdown_cell}
  nb = nbformat.v4.new_notebook(metadata=METADATA)
  nb.cells = [make[kind](src, id=cid) for kind, cid, src in cells]
  return nb


def main(argv) -> int:
  nb = build_notebook()
  text = nbformat.writes(nb) + "\n"
  if "--check" in argv:
    with open(NOTEBOOK, encoding="utf-8") as f:
      if f.read() != text:
        print("colab/rcst_imagenet.ipynb is stale: run colab/build_notebook.py", file=sys.stderr)
        return 1
    return 0
  with open(NOTEBOOK, "w", encoding="utf-8") as f:
    f.write(text)
  print(f"wrote {NOTEBOOK}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
