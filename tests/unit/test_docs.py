"""The README is a front page and the docs hold the rest: every link resolves, none leaves the repository."""

import re
from pathlib import Path

import pytest

DOCS = ["design", "cache-format", "methods", "sweeps", "cluster", "failures", "benchmarks"]
PAGES = [Path("README.md"), *(Path("docs") / f"{name}.md" for name in DOCS)]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """The text outside fenced code blocks (commands and addresses live in those)."""
    return re.sub(r"```.*?```", "", text, flags=re.S)


def _anchors(text: str) -> set[str]:
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_readme_is_a_front_page_that_starts_with_the_two_commands():
    text = Path("README.md").read_text()
    assert len(text.splitlines()) <= 150
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    assert first_block.splitlines()[0].startswith("make demo") and first_block.splitlines()[1].startswith("make test")
    for name in DOCS:
        assert f"docs/{name}.md" in text, f"the README does not point at docs/{name}.md"


@pytest.mark.parametrize("page", PAGES, ids=str)
def test_every_link_resolves_inside_the_repository(page):
    text = page.read_text()
    for target in LINK.findall(_prose(text)):
        assert not re.match(r"[a-z]+://|mailto:", target), f"{page} links outside the repository: {target}"
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page.resolve()
        assert resolved.exists(), f"{page} links to {target}, which does not exist"
        assert Path.cwd().resolve() in resolved.parents or resolved == Path.cwd().resolve(), f"{page}: {target} is outside the repo"
        if anchor and resolved.suffix == ".md":
            assert anchor in _anchors(resolved.read_text()), f"{page}: no heading for #{anchor} in {path or page}"
    assert "../shared" not in text


def test_the_design_module_table_lists_every_module():
    """docs/design.md's package table has a row for each folder of the package, naming every module in it."""
    text = Path("docs/design.md").read_text()
    rows = dict(re.findall(r"^\| `(pipeline/[\w/]*)` \| (.+) \|$", text, re.M))
    folders = {str(p.parent) + "/" for p in Path("pipeline").rglob("__init__.py")}
    assert set(rows) == folders
    for folder, cell in rows.items():
        named = set(re.findall(r"`(\w+)`", cell))
        modules = {p.stem for p in Path(folder).glob("*.py") if p.stem != "__init__"}
        assert modules <= named, f"{folder}: not in docs/design.md: {sorted(modules - named)}"
