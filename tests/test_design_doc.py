"""docs/design.md ships with the repository and every citation of it names a section it has."""
from __future__ import annotations

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("max_deeplab", "tests", "benchmarks", "configs", "scripts", "docs", "README.md",
           "CONVENTIONS.md", "setup.py")


def _text_files():
    for top in SOURCES:
        path = os.path.join(REPO, top)
        if os.path.isfile(path):
            yield path
        for root, _, names in os.walk(path):
            for name in names:
                if name.endswith((".py", ".md", ".gin", ".sh", ".c")):
                    yield os.path.join(root, name)


def test_every_citation_names_a_section_of_the_design_doc():
    with open(os.path.join(REPO, "docs", "design.md"), encoding="utf-8") as f:
        sections = set(re.findall(r"^## (\d+)\.", f.read(), re.MULTILINE))
    assert {"3", "4", "5", "9"} <= sections
    cited, stale = {}, []
    for path in _text_files():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for first, second in re.findall(r"docs/design\.md §(\d+)(?:[-–](\d+))?", text):
            for number in filter(None, (first, second)):
                cited.setdefault(number, []).append(os.path.relpath(path, REPO))
        if re.search(r"\bDESIGN(\.md)?\b", text) and not path.endswith("test_design_doc.py"):
            stale.append(os.path.relpath(path, REPO))
    assert len(cited) >= 5
    missing = {n: paths[:3] for n, paths in cited.items() if n not in sections}
    assert not missing, f"sections cited but not in docs/design.md: {missing}"
    assert not stale, f"citations of a design document outside the repository: {stale}"
