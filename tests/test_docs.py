"""The README is a user's guide and every link in the README, the docs and the results' READMEs resolves
inside the repository (a user's clone has no ../shared)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md")),
        *sorted((REPO / "results").glob("*/README.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves_inside_the_repository(doc):
    text = doc.read_text(encoding="utf-8")
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+://|^#|^mailto:", target):
            continue
        path = (doc.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{doc.relative_to(REPO)} links {target}, which does not exist"
        assert REPO in path.parents or path == REPO, f"{doc.relative_to(REPO)} links {target}, outside the repository"


def test_nothing_points_at_the_workspace_s_shared_docs():
    for path in [*DOCS, *(REPO / "src").rglob("*.py"), *(REPO / "src").rglob("*.yaml")]:
        assert "shared/docs" not in path.read_text(encoding="utf-8"), f"{path} points at ../shared/docs"


def test_the_readme_is_a_guide_of_at_most_350_lines():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 350
    for heading in ("## Set up", "## Your own data", "## Use what you trained", "## Add a method", "## Layout"):
        assert heading in lines, heading
