"""The front door: a README a newcomer reads in minutes, whose links and
paper-to-code map point at code that exists."""

import ast
import glob
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(REPO, "README.md"), *glob.glob(os.path.join(REPO, "docs", "*.md")),
         os.path.join(REPO, "benchmarks", "RESULTS.md")]


def _read(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


def test_the_readme_is_short():
  assert os.path.getsize(os.path.join(REPO, "README.md")) <= 10 * 1024


def test_every_relative_link_resolves():
  broken = []
  for page in PAGES:
    for target in re.findall(r"\]\(([^)\s]+)\)", _read(page)):
      if re.match(r"[a-z]+://|#|mailto:", target):
        continue
      path = os.path.normpath(os.path.join(os.path.dirname(page), target.split("#")[0]))
      if not os.path.exists(path):
        broken.append(f"{os.path.relpath(page, REPO)} -> {target}")
  assert not broken, broken


def _defines(path: str, name: str) -> bool:
  tree = ast.parse(_read(path))
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
      return True
    if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
      return True
  return False


def test_each_paper_equation_names_a_function_its_file_defines():
  section = _read(PAGES[0]).split("## From the paper to the code", 1)[1].split("\n## ", 1)[0]
  rows = [r for r in section.splitlines() if r.startswith("|") and "](" in r]
  assert len(rows) >= 15
  missing, checked = [], 0
  for row in rows:
    for link, names in re.findall(r"\]\(([^)]+\.py)\)((?:\s*\(?[\w`:\s.-]*`\w+(?:\.\w+)?`)+)", row):
      for name in re.findall(r"`(\w+(?:\.\w+)?)`", names):
        checked += 1
        if not _defines(os.path.join(REPO, link), name.split(".")[-1]):
          missing.append(f"{link} {name}")
  assert not missing, missing
  assert checked >= len(rows), "a row whose function the test could not read"
  for eq in ("Eq. 2", "Eq. 3", "Eq. 15", "Eqs. 17-18", "Algorithm 1", "Algorithm 2"):
    assert eq in section, eq
