"""Fast checks of the book's structure: table of contents, chapter notebooks, bibliography.

They read files only (no notebook is executed here; nbval does that in .ci/run), so they run
in well under a second.
"""
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = (".md", ".ipynb", ".rst")
CITE = re.compile(r"\{cite(?::[a-z]+)?\}`([^`]+)`")  # {cite}`a,b`, {cite:t}`a`, {cite:p}`b` ...


def load_yaml(name):
    return yaml.safe_load((ROOT / name).read_text(encoding="utf-8"))


def toc_files():
    """Every `file:` entry of _toc.yml, the root included, in order."""
    toc = load_yaml("_toc.yml")
    found = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                found.append(entry["file"])
            for key in ("parts", "chapters", "sections"):
                walk(entry.get(key))

    walk(toc.get("parts"))
    walk(toc.get("chapters"))
    return found


def resolve(entry):
    """The file a toc entry names (entries have no suffix), or None."""
    path = ROOT / entry
    if path.suffix in SUFFIXES and path.is_file():
        return path
    hits = [path.with_name(path.name + s) for s in SUFFIXES if path.with_name(path.name + s).is_file()]
    return hits[0] if len(hits) == 1 else None


def chapter_notebooks():
    """notebooks/*.ipynb, except helpers and templates whose names start with '_'."""
    return sorted(p for p in (ROOT / "notebooks").glob("*.ipynb") if not p.name.startswith("_"))


def read_notebook(path):
    return json.loads(path.read_text(encoding="utf-8"))


def cell_text(cell):
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


NOTEBOOKS = chapter_notebooks()
needs_notebooks = pytest.mark.skipif(not NOTEBOOKS, reason="no chapter notebooks in notebooks/ yet")


# --- table of contents -------------------------------------------------------------------

def test_toc_lists_only_existing_files():
    missing = [entry for entry in toc_files() if resolve(entry) is None]
    assert not missing, f"_toc.yml lists files that do not exist (or are ambiguous): {missing}"


def test_toc_has_no_duplicates():
    entries = toc_files()
    assert len(entries) == len(set(entries)), "a file is listed twice in _toc.yml"


def test_every_book_page_is_in_the_toc():
    listed = {resolve(entry) for entry in toc_files()}
    pages = sorted((ROOT / "book").glob("*.md"))
    unlisted = [p.relative_to(ROOT).as_posix() for p in pages if p not in listed]
    assert not unlisted, f"pages in book/ missing from _toc.yml: {unlisted}"


@needs_notebooks
def test_every_notebook_is_in_the_toc():
    listed = {resolve(entry) for entry in toc_files()}
    unlisted = [p.relative_to(ROOT).as_posix() for p in NOTEBOOKS if p not in listed]
    assert not unlisted, f"notebooks missing from _toc.yml (see its comment block): {unlisted}"


@needs_notebooks
def test_chapters_are_listed_in_file_order():
    listed = [resolve(e) for e in toc_files()]
    order = [p.name for p in listed if p is not None and p.suffix == ".ipynb"]
    assert order == sorted(order), f"chapters out of order in _toc.yml: {order}"


# --- chapter notebooks -------------------------------------------------------------------

def colab_link(path):
    repo = load_yaml("_config.yml")["repository"]
    base = repo["url"].rstrip("/").replace("https://github.com/", "")
    rel = path.relative_to(ROOT).as_posix()
    return f"https://colab.research.google.com/github/{base}/blob/{repo['branch']}/{rel}"


@needs_notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_colab_badge_first(path):
    cells = read_notebook(path)["cells"]
    assert cells, f"{path.name} is empty"
    first = cell_text(cells[0])
    assert cells[0]["cell_type"] == "markdown", f"{path.name}: the first cell must be Markdown"
    assert "colab-badge.svg" in first, f"{path.name}: no Colab badge in the first cell"
    assert colab_link(path) in first, f"{path.name}: the badge must link to {colab_link(path)}"


@needs_notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_asks_colab_for_a_gpu(path):
    meta = read_notebook(path)["metadata"]
    assert meta.get("accelerator") == "GPU", f'{path.name}: metadata needs "accelerator": "GPU"'
    assert isinstance(meta.get("colab"), dict), f'{path.name}: metadata needs "colab": {{"provenance": []}}'
    assert "provenance" in meta["colab"], f'{path.name}: metadata "colab" needs "provenance"'


@needs_notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_uses_the_python3_kernel(path):
    # nbval and Colab start the kernel named here; .ci/run maps it to its own environment.
    kernelspec = read_notebook(path)["metadata"].get("kernelspec", {})
    assert kernelspec.get("name") == "python3", f"{path.name}: kernelspec name must be python3"


@needs_notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_with_outputs(path):
    # The book is built with execute_notebooks: "off"; a notebook without outputs would be
    # published without its figures and numbers.
    code = [c for c in read_notebook(path)["cells"] if c["cell_type"] == "code"]
    assert any(c.get("outputs") for c in code), (
        f"{path.name} has no outputs: run it with GLMC_PROFILE=standard before committing")


# --- bibliography ------------------------------------------------------------------------

def bibliography():
    from pybtex.database import parse_file  # comes with sphinxcontrib-bibtex

    bibfiles = load_yaml("_config.yml")["bibtex_bibfiles"]
    entries = {}
    for name in bibfiles:
        entries.update(parse_file(str(ROOT / name), bib_format="bibtex").entries)
    return entries


def cited_keys():
    """{key: [where it is cited]} over book/*.md and every notebook's Markdown cells."""
    texts = [(p, p.read_text(encoding="utf-8")) for p in sorted((ROOT / "book").glob("*.md"))]
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = read_notebook(path)["cells"]
        texts.append((path, "\n".join(cell_text(c) for c in cells if c["cell_type"] == "markdown")))
    keys = {}
    for path, text in texts:
        for group in CITE.findall(text):
            for key in group.split(","):
                keys.setdefault(key.strip(), []).append(path.relative_to(ROOT).as_posix())
    return keys


def test_bibliography_parses_and_has_the_basic_fields():
    entries = bibliography()
    assert entries, "book/references.bib is empty"
    for key, entry in entries.items():
        assert "title" in entry.fields and "year" in entry.fields, f"{key}: needs title and year"
        assert entry.persons.get("author"), f"{key}: needs authors"


def test_every_cited_key_is_in_the_bibliography():
    entries = bibliography()
    cited = cited_keys()
    assert cited, "no {cite} found in book/*.md"
    missing = {key: where for key, where in cited.items() if key not in entries}
    assert not missing, f"cited but not in book/references.bib: {missing}"


def test_the_bibliography_is_printed_once():
    # A second {bibliography} directive would duplicate every citation target (a warning).
    pages = [p for p in sorted((ROOT / "book").glob("*.md")) + sorted((ROOT / "notebooks").glob("*.ipynb"))
             if "{bibliography}" in p.read_text(encoding="utf-8")]
    names = [p.relative_to(ROOT).as_posix() for p in pages]
    assert names == ["book/references.md"], f"{{bibliography}} must appear once, in book/references.md: {names}"
