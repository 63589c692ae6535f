"""The documentation a clone of mtpd gets is self-contained: nothing points outside the repository, and the
design document that README and docstrings cite exists and has the sections they cite."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DESIGN_DOC = ROOT / "docs" / "design.md"
OUTSIDE = "../" + "shared"  # the team's notes beside the checkout; spelled in two parts so grep finds no hit here


def _text_files():
    """README.md and the text files under docs/, src/ and benchmarks/ (build outputs such as *.egg-info,
    which pip writes from the README of its day, and binary files left out)."""
    yield ROOT / "README.md"
    for folder in ("docs", "src", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*")):
            if not path.is_file() or any(part.endswith(".egg-info") or part == "__pycache__" for part in path.parts):
                continue
            data = path.read_bytes()
            if b"\0" not in data[:8192]:
                yield path


def test_nothing_points_outside_the_repository():
    offenders = [str(path.relative_to(ROOT)) for path in _text_files()
                 if OUTSIDE in path.read_text(encoding="utf-8", errors="replace")]
    assert offenders == []


def test_readme_links_the_design_document_which_exists():
    assert DESIGN_DOC.is_file()
    assert "](docs/design.md" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_cited_design_sections_exist():
    sections = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", DESIGN_DOC.read_text(encoding="utf-8"), re.MULTILINE))
    cited, bare = {}, []
    for path in _text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for number in re.findall(r"docs/design\.md §(\d+(?:\.\d+)?)", text):
            cited.setdefault(number, str(path.relative_to(ROOT)))
        if re.search(r"\bDESIGN §", text):  # the team's old notes' name: a reader could not find the file
            bare.append(str(path.relative_to(ROOT)))
    assert cited, "no docstring cites docs/design.md"
    missing = {number: where for number, where in cited.items() if number not in sections}
    assert missing == {}
    assert bare == []
