"""Every reference in the code, the notebooks and the README resolves inside the repository: each decision D<n>
is a row of docs/method.md §12, each cited `docs/...` file exists, and each `docs/<file>.md §N` names a section
that file has."""

import re
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*ROOT.glob("*.py"), *(path for folder in ("util", "world", "tools", "tests") for path in ROOT.glob(f"{folder}/*.py")),
                  *ROOT.glob("notebooks/*.ipynb"), *ROOT.glob("docs/*.md"), ROOT / "README.md"])
DOC_PATH = re.compile(r"docs/[\w./-]*\w")
SECTION_REFERENCE = re.compile(r"(docs/\w+\.md)`?\)?((?:,? ?(?:and )?§\d+(?:\.\d+)?(?:-§?\d+(?:\.\d+)?)?)+)")


def text(path: Path) -> str:
    """A source's text; of a notebook, its cells' sources (its stored outputs hold base64 figures, not references)."""
    if path.suffix == ".ipynb":
        return "\n".join(cell.source for cell in nbformat.read(path, as_version=4).cells)
    return path.read_text()


def headings(doc: Path) -> set[str]:
    """The section numbers of a markdown file: '## 6. Losses' -> '6', '### 6.3 ...' -> '6.3'."""
    return {m.group(1) for m in re.finditer(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", doc.read_text(), re.MULTILINE)}


def test_the_sources_are_found():
    names = {path.name for path in SOURCES}
    assert {"maco.py", "train.py", "README.md", "04_phrase_grounding.ipynb", "released.py", "ablate.py", "synthetic.py",
            "default-run.md"} <= names


def test_every_decision_number_is_defined_in_the_method_document():
    defined = set(re.findall(r"^\| (D\d+) \|", (ROOT / "docs/method.md").read_text(), re.MULTILINE))
    assert defined == {f"D{n}" for n in range(1, 15)}
    for path in SOURCES:
        cited = set(re.findall(r"\bD\d{1,2}\b", text(path)))
        assert cited <= defined, f"{path.name} cites {sorted(cited - defined)}, not defined in docs/method.md §12"


def test_every_cited_docs_file_exists():
    for path in SOURCES:
        for cited in set(DOC_PATH.findall(text(path))):
            assert (ROOT / cited).exists(), f"{path.name} cites {cited}, which is not in the repository"


def test_every_cited_section_exists_in_its_document():
    checked = 0
    for path in SOURCES:
        for doc, sections in SECTION_REFERENCE.findall(text(path)):
            available = headings(ROOT / doc)
            for number in re.findall(r"§?(\d+(?:\.\d+)?)", sections):
                assert number in available, f"{path.name} cites {doc} §{number}; its sections are {sorted(available)}"
                checked += 1
    assert checked > 20  # the pattern keeps finding the references
