"""The docs stay in step with the tree: the front pages' commands, relative links, the layout
page."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FRONT = [ROOT / "README.md", ROOT / "README.zh-CN.md"]
PAGES = FRONT + sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def first_commands(page: Path) -> list[str]:
    """The commands of a page's first ```bash block, without their trailing # comments."""
    block = re.search(r"```bash\n(.*?)```", page.read_text(encoding="utf-8"), re.S)
    assert block, f"{page.name} has no ```bash block"
    return [line.split(" #")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_both_front_pages_show_the_same_two_commands():
    en, zh = (first_commands(p) for p in FRONT)
    assert en == zh and len(en) == 2
    assert (
        en[1] == "bash scripts/setup.sh test && .venv/bin/python -m pytest -q"
    )  # what .ci/run runs
    assert en[0].startswith("bash scripts/setup.sh && ") and en[0].endswith("zerolm speedrun")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # not code
    targets = [t for t in LINK.findall(text) if not re.match(r"[a-z]+:|#", t)]
    missing = [t for t in targets if not (page.parent / t.split("#")[0]).exists()]
    assert not missing, f"{page.name}: links to missing files {missing}"


def test_front_pages_link_to_each_other_and_every_docs_page():
    en, zh = (p.read_text(encoding="utf-8") for p in FRONT)
    assert "(README.zh-CN.md)" in en.split("\n## ")[0] and "(README.md)" in zh.split("\n## ")[0]
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"README.md"}
    for name, text in (("README.md", en), ("README.zh-CN.md", zh)):
        assert not [p for p in pages if f"(docs/{p})" not in text], f"{name} misses a docs page"


def test_layout_page_is_generated_from_the_tree():
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "layout.py")],
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=60,
        check=True,
    ).stdout
    page = (ROOT / "docs" / "layout.md").read_text(encoding="utf-8")
    assert page == out, "docs/layout.md is out of date: run `python scripts/layout.py --write`"
