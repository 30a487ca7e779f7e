"""The design document is in the repository and every reference to it points at a section that exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "DESIGN.md"
SCANNED_DIRS = ("interp_train", "evaluation", "tests", "benchmarks", "study", "recipes", "docs")
SCANNED_FILES = ("README.md", "Makefile", "pyproject.toml")
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg"}
HEADING = re.compile(r"^#{2,3} (\d+(?:\.\d+)*)\.? \S", re.M)
REFERENCE = re.compile(r"docs/DESIGN\.md §(\d+(?:\.\d+)*)")
SECTION_MARK = re.compile(r"§(\d+(?:\.\d+)*)")
BARE = re.compile(r"(?<!docs/)DESIGN\.md")
WORDY = re.compile(r"docs/DESIGN\.md,? sections?\b")


def sections() -> list[str]:
    return HEADING.findall(DESIGN.read_text())


def scanned_files() -> list[Path]:
    files = [ROOT / name for name in SCANNED_FILES if (ROOT / name).exists()]
    for folder in SCANNED_DIRS:
        files += [p for p in sorted((ROOT / folder).rglob("*")) if p.is_file() and p.suffix in SUFFIXES
                  and "__pycache__" not in p.parts]
    return [p for p in files if p.resolve() != Path(__file__).resolve()]


def test_design_sections_are_numbered_in_order_without_gaps():
    found = sections()
    assert found[:7] == ["1", "2", "2.1", "2.2", "2.3", "2.4", "2.5"], found[:7]
    assert len(found) == len(set(found)), f"duplicate section numbers: {found}"
    previous = None
    for number in found:
        parts = [int(p) for p in number.split(".")]
        if previous is not None:
            top, prev_top = parts[0], previous[0]
            if len(parts) == 1:
                assert top == prev_top + 1, f"section {number} follows {'.'.join(map(str, previous))}"
            else:
                expected_sub = previous[1] + 1 if len(previous) == 2 and prev_top == top else 1
                assert top == prev_top and parts[1] == expected_sub, \
                    f"section {number} follows {'.'.join(map(str, previous))}"
        previous = parts


def test_every_reference_names_an_existing_section():
    known = set(sections())
    references = []
    for path in scanned_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        marks = SECTION_MARK.findall(text) if path == DESIGN else REFERENCE.findall(text)
        references += [(path.relative_to(ROOT), number) for number in marks]
    from_code = [r for r in references if r[0] != DESIGN.relative_to(ROOT)]
    assert len(from_code) >= 20, f"expected the code to cite sections of the document, found {len(from_code)}"
    dangling = [f"{path}: §{number}" for path, number in references if number not in known]
    assert not dangling, f"references to sections that docs/DESIGN.md does not have: {dangling}"


def test_no_reference_to_a_design_file_outside_the_repository():
    bare, wordy = [], []
    for path in scanned_files():
        if path == DESIGN:
            continue
        for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if BARE.search(line):
                bare.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
            if WORDY.search(line):
                wordy.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert not bare, "cite the design document as 'docs/DESIGN.md §N':\n" + "\n".join(bare)
    assert not wordy, "cite sections as 'docs/DESIGN.md §N', not 'section N':\n" + "\n".join(wordy)


def test_the_checks_catch_what_they_are_for():
    assert BARE.search("see DESIGN.md §4") and not BARE.search("see docs/DESIGN.md §4")
    assert REFERENCE.findall("docs/DESIGN.md §4.10 and docs/DESIGN.md §3") == ["4.10", "3"]
    assert WORDY.search("(docs/DESIGN.md section 5)")
    assert "4.10" in sections() and "99" not in sections()
