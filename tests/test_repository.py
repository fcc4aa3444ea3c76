"""The repository explains itself: every file, section and link its code and docs point to exists.

Code comments and docs cite the design document as "docs/design.md, <Section>", name files by their
path from the repository root and link between markdown files. A renamed section or a moved file
would leave such a pointer dangling; these tests find it. They read the tracked files of a git
checkout (a bare copy of the sources, as the GPU-versions build makes, has no docs to check).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

if not (ROOT / ".git").exists():
    pytest.skip("not a git checkout: the tracked files are unknown", allow_module_level=True)

TRACKED = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
# Generated results are data, not prose; the tests construct made-up paths as test data.
TEXT_FILES = [
    ROOT / name
    for name in TRACKED
    if not name.startswith(("bench/results/", "python/results/", "tests/test_"))
    and Path(name).suffix in {".md", ".py", ".h", ".cuh", ".cu", ".cpp", ".sh", ".toml", ".txt", ""}
    and (ROOT / name).is_file()
]
# Folders the build and the programs write into (ignored by git): paths there need not exist.
GENERATED = ("prebuilt/", "build/", "runs/", "dwf_kernels/_C", "dwf_kernels/_build_info.py")
PATH = re.compile(r"(?<![\w/.-])((?:docs|csrc|dwf_kernels|tests|bench|python|\.ci)/[\w./*{},-]*[\w*}])")
SECTION = re.compile(r"docs/([\w-]+\.md), ([A-Z][\w +/'-]*?)[)\n:;]")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except UnicodeDecodeError:
        return ""


def _expand_braces(path: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", path)
    if not match:
        return [path]
    head, tail = path[: match.start()], path[match.end() :]
    return [p for alt in match.group(1).split(",") for p in _expand_braces(head + alt + tail)]


def _headings(doc: Path) -> set[str]:
    return {line.lstrip("#").strip() for line in _read(doc).splitlines() if line.startswith("#")}


def test_every_path_named_in_code_and_docs_exists():
    missing = []
    for file in TEXT_FILES:
        for number, line in enumerate(_read(file).splitlines(), 1):
            for mention in PATH.findall(line):
                for path in _expand_braces(mention.rstrip(".,")):
                    if path.startswith(GENERATED) or "*" in path:  # a pattern, not a path
                        continue
                    if not (ROOT / path).exists():
                        missing.append(f"{file.relative_to(ROOT)}:{number}: {path}")
    assert not missing, "paths that do not exist:\n" + "\n".join(missing)


def test_every_cited_design_section_exists():
    missing = []
    for file in TEXT_FILES:
        for doc, section in SECTION.findall(_read(file)):
            target = ROOT / "docs" / doc
            if not target.exists() or section.strip() not in _headings(target):
                missing.append(f"{file.relative_to(ROOT)}: docs/{doc}, {section.strip()}")
    assert not missing, "cited sections that do not exist:\n" + "\n".join(missing)


def test_every_markdown_link_resolves():
    missing = []
    for file in TEXT_FILES:
        if file.suffix != ".md":
            continue
        for target in LINK.findall(_read(file)):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (file.parent / target).exists():
                missing.append(f"{file.relative_to(ROOT)}: {target}")
    assert not missing, "links that lead nowhere:\n" + "\n".join(missing)


def test_nothing_points_outside_the_repository():
    """The design brief and toolchain notes the code once cited live outside the repository."""
    outside = re.compile(r"\.\./shared|\bDESIGN\.md|\bTOOLCHAIN\.md|\bSTYLE\.md")
    found = [
        f"{file.relative_to(ROOT)}:{number}: {line.strip()}"
        for file in TEXT_FILES
        for number, line in enumerate(_read(file).splitlines(), 1)
        if outside.search(line)
    ]
    assert not found, "references to files outside the repository:\n" + "\n".join(found)
