"""The documentation covers the package: fast checks, no Sphinx needed.

Every public name is listed in docs/api.rst, every page is reachable from the index's
toctree, and every figure or table file a page includes exists.
"""

import pathlib
import re

import pytest

import convbasis

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(p.stem for p in DOCS.glob("*.rst") if p.stem != "index")


def toctree_entries(text):
    """Document names listed in the ``.. toctree::`` directives of ``text``."""
    entries = []
    for block in re.findall(r"^\.\. toctree::\n((?:[ \t]+.*\n|[ \t]*\n)*)", text, flags=re.M):
        for line in block.splitlines():
            line = line.strip()
            if line and not line.startswith(":"):
                entries.append(line.removesuffix(".rst"))
    return entries


def test_toctree_parser():
    text = ".. toctree::\n   :maxdepth: 2\n\n   one\n   two.rst\n\nafter\n   three\n"
    assert toctree_entries(text) == ["one", "two"]


def test_every_page_is_in_the_index_toctree():
    entries = toctree_entries((DOCS / "index.rst").read_text(encoding="utf-8"))
    missing = sorted(set(PAGES) - set(entries))
    assert not missing, f"pages not in index.rst's toctree: {missing}"
    unknown = sorted(set(entries) - set(PAGES))
    assert not unknown, f"toctree entries without a page: {unknown}"


@pytest.mark.parametrize("name", sorted(convbasis.__all__))
def test_public_name_is_in_api_reference(name):
    api = (DOCS / "api.rst").read_text(encoding="utf-8")
    listed = re.findall(r"^[ \t]+convbasis\.(\w+)[ \t]*$", api, flags=re.M)
    assert name in listed, f"convbasis.{name} is missing from docs/api.rst"


@pytest.mark.parametrize("page", [*PAGES, "index"])
def test_included_files_exist(page):
    text = (DOCS / f"{page}.rst").read_text(encoding="utf-8")
    paths = re.findall(r"^\.\. (?:image|figure|include):: (\S+)", text, flags=re.M)
    paths += re.findall(r"^[ \t]+:file: (\S+)", text, flags=re.M)
    missing = [p for p in paths if not (DOCS / p).is_file()]
    assert not missing, f"{page}.rst includes missing files: {missing}"
