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


# --- one repository URL (_config.yml) for badges, install cells and docs ---------------

def repository_url():
    return load_yaml("_config.yml")["repository"]["url"].rstrip("/")


GITHUB_URL = re.compile(r"https://github\.com/[\w.-]+/[\w.-]+")
COLAB_URL = re.compile(r"https://colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/")


@needs_notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_installs_from_the_configured_repository(path):
    # On Colab the setup cell installs glmc_mini from the repository _config.yml names.
    code = [cell_text(c) for c in read_notebook(path)["cells"] if c["cell_type"] == "code"]
    installs = [line for text in code for line in text.splitlines() if "pip install" in line]
    assert installs, f"{path.name}: no install line in a code cell (the setup cell installs glmc_mini)"
    for line in installs:
        assert f"git+{repository_url()}" in line, f"{path.name}: {line.strip()!r} is not {repository_url()}"


def test_docs_use_the_configured_repository():
    # README and the book's pages name the repository only as _config.yml does.
    url, slug = repository_url(), repository_url().replace("https://github.com/", "")
    for path in [ROOT / "README.md", *sorted((ROOT / "book").glob("*.md"))]:
        text = path.read_text(encoding="utf-8")
        for found in GITHUB_URL.findall(text):
            assert found.rstrip(".") == url, f"{path.name}: {found} is not the configured {url}"
        for found in COLAB_URL.findall(text):
            assert found == slug, f"{path.name}: a Colab link points to {found}, not {slug}"


# --- what the rendered pages show ----------------------------------------------------------

def book_texts():
    """(name, text) of README.md, book/*.md and every notebook cell's source."""
    yield "README.md", (ROOT / "README.md").read_text(encoding="utf-8")
    for path in sorted((ROOT / "book").glob("*.md")):
        yield path.name, path.read_text(encoding="utf-8")
    for path in NOTEBOOKS:
        for i, cell in enumerate(read_notebook(path)["cells"]):
            yield f"{path.name} cell {i}", cell_text(cell)


def test_no_reference_to_files_outside_the_repository():
    # Readers have the repository only: no pointers to the developers' shared notes.
    bad = re.compile(r"shared/|design\.md|paper\.md")
    hits = [name for name, text in book_texts() if bad.search(text)]
    assert not hits, f"references to files outside the repository in: {hits}"


@needs_notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_code_lines_fit_the_page(path):
    long = [(i, line) for i, c in enumerate(read_notebook(path)["cells"]) if c["cell_type"] == "code"
            for line in cell_text(c).splitlines() if len(line) > 88]
    assert not long, f"{path.name}: code lines over 88 characters (cell, line): {long}"


def stream_outputs(path):
    for i, cell in enumerate(read_notebook(path)["cells"]):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                yield i, out.get("name"), cell_text({"source": out.get("text", "")})


@needs_notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_outputs_are_clean(path):
    # No leftover progress bars, no 16-digit floats, no printed line wider than the page.
    bar = re.compile(r"\d+%\|.*\|| \d+/\d+ \[\d")
    digits = re.compile(r"\d\.\d{9,}")
    for i, name, text in stream_outputs(path):
        assert not bar.search(text), f"{path.name} cell {i}: a progress bar in the committed {name}"
        assert not digits.search(text), f"{path.name} cell {i}: unrounded numbers in the output"
        wide = [line for line in text.splitlines() if len(line) > 100]
        assert not wide, f"{path.name} cell {i}: printed lines over 100 characters: {wide}"


GLUE_ROLE = re.compile(r"\{glue(?::[a-z]+)?\}`([\w.-]+)(?::[^`]*)?`")


def glued_names(path):
    """Names glued in the committed outputs of a notebook (myst-nb's scrapbook metadata)."""
    names = []
    for cell in read_notebook(path)["cells"]:
        for out in cell.get("outputs", []):
            scrap = out.get("metadata", {}).get("scrapbook")
            if scrap:
                names.append(scrap["name"])
    return names


@needs_notebooks
def test_glue_names_are_unique_across_the_book():
    names = [name for path in NOTEBOOKS for name in glued_names(path)]
    dupes = sorted({n for n in names if names.count(n) > 1})
    assert not dupes, f"glue names used twice (prefix them with the chapter): {dupes}"


@needs_notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_quoted_number_is_glued(path):
    # The prose quotes run results only through {glue:text}`name`; each name must be in the
    # committed outputs (re-run the chapter with GLMC_PROFILE=standard after changing its glue).
    cells = read_notebook(path)["cells"]
    used = {m for c in cells if c["cell_type"] == "markdown" for m in GLUE_ROLE.findall(cell_text(c))}
    missing = sorted(used - set(glued_names(path)))
    assert not missing, f"{path.name}: quoted but not glued in the committed outputs: {missing}"


@needs_notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_chapter_has_a_references_section(path):
    cells = [cell_text(c) for c in read_notebook(path)["cells"] if c["cell_type"] == "markdown"]
    assert any(re.search(r"^## References$", text, re.M) for text in cells[-3:]), (
        f"{path.name}: the chapter must end with a '## References' section")


# --- the course kit: numbered statements, exercises with solutions, instructor's guide ---
# (sphinx-proof and sphinx-exercise; the format is described in book/instructor_guide.md)

CHAPTERS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
needs_chapters = pytest.mark.skipif(not CHAPTERS, reason="no chapter notebooks yet")
DIRECTIVE = re.compile(r"^(?P<fence>:{3,}|`{3,})\{(?P<name>[\w:-]+)\}[ \t]*(?P<arg>.*)$")
OPTION = re.compile(r"^:(?P<key>[\w-]+):[ \t]*(?P<value>.*)$")
STATEMENTS = ("prf:definition", "prf:proposition", "prf:theorem", "prf:lemma", "prf:corollary")
PRF_REF = re.compile(r"\{prf:ref\}`(?:[^`<]*<)?([\w-]+)>?`")


def directives(text):
    """(name, argument, options) of every MyST directive opened in ``text``, in order."""
    found, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        match = DIRECTIVE.match(line)
        if not match:
            continue
        options = {}
        for following in lines[i + 1:]:
            option = OPTION.match(following)
            if not option:
                break
            options[option["key"]] = option["value"].strip()
        found.append((match["name"], match["arg"].strip(), options))
    return found


def markdown_cells(path):
    return [cell_text(c) for c in read_notebook(path)["cells"] if c["cell_type"] == "markdown"]


def chapter_directives(path):
    return [d for text in markdown_cells(path) for d in directives(text)]


def exercise_labels(path):
    return [opts.get("label") for name, _, opts in chapter_directives(path) if name == "exercise"]


@needs_chapters
@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_chapter_has_labelled_exercises(path):
    labels = exercise_labels(path)
    assert len(labels) >= 2, f"{path.name}: needs at least two {{exercise}} directives, has {len(labels)}"
    assert all(labels), f"{path.name}: every {{exercise}} needs a :label: (solutions refer to it)"
    assert len(labels) == len(set(labels)), f"{path.name}: exercise labels used twice: {labels}"


@needs_chapters
@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_every_exercise_has_a_hidden_solution(path):
    found = chapter_directives(path)
    solutions = [(arg, opts) for name, arg, opts in found if name in ("solution", "solution-start")]
    solved = {arg for arg, _ in solutions}
    unsolved = [label for label in exercise_labels(path) if label not in solved]
    assert not unsolved, f"{path.name}: exercises without a {{solution}} or {{solution-start}}: {unsolved}"
    orphans = sorted(solved - set(exercise_labels(path)))
    assert not orphans, f"{path.name}: solutions to exercises that do not exist here: {orphans}"
    shown = [arg for arg, opts in solutions if "dropdown" not in opts.get("class", "").split()]
    assert not shown, f"{path.name}: solutions must be hidden until opened (:class: dropdown): {shown}"


@needs_chapters
@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_gated_solutions_are_closed(path):
    # {solution-start} ... code cells ... {solution-end}: strictly alternating, none left open.
    gates = [name for name, _, _ in chapter_directives(path) if name in ("solution-start", "solution-end")]
    expected = ["solution-start", "solution-end"] * (len(gates) // 2)
    assert gates == expected, f"{path.name}: {{solution-start}} / {{solution-end}} do not pair up: {gates}"


@needs_chapters
@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_chapter_has_numbered_statements_with_proofs(path):
    statements = [(name, opts) for name, _, opts in chapter_directives(path) if name in STATEMENTS]
    assert statements, f"{path.name}: no numbered statement ({{prf:definition}}, {{prf:proposition}}, ...)"
    unlabelled = [name for name, opts in statements if not opts.get("label")]
    assert not unlabelled, f"{path.name}: statements without a :label: ({unlabelled})"
    # every proposition (theorem, lemma, corollary) is proved in the same cell, before the next one
    for text in markdown_cells(path):
        names = [name for name, _, _ in directives(text)]
        for i, name in enumerate(names):
            if name in STATEMENTS[1:]:
                rest = names[i + 1:]
                nxt = next((n for n in rest if n in STATEMENTS or n == "prf:proof"), None)
                assert nxt == "prf:proof", f"{path.name}: a {name} without a {{prf:proof}} after it"


def statement_labels():
    labels = []
    for path in CHAPTERS:
        labels += [opts["label"] for name, _, opts in chapter_directives(path)
                   if (name in STATEMENTS or name == "exercise") and opts.get("label")]
    return labels


@needs_chapters
def test_statement_and_exercise_labels_are_unique_across_the_book():
    labels = statement_labels()
    dupes = sorted({label for label in labels if labels.count(label) > 1})
    assert not dupes, f"labels used twice (prefix them with the chapter, ch<N>-): {dupes}"


@needs_chapters
def test_every_prf_ref_points_to_a_statement():
    known = set(statement_labels())
    missing = {(name, label) for name, text in book_texts() for label in PRF_REF.findall(text)
               if label not in known}
    assert not missing, f"{{prf:ref}} to labels that no statement defines: {sorted(missing)}"


def test_the_course_kit_extensions_are_configured():
    extensions = load_yaml("_config.yml")["sphinx"].get("extra_extensions", [])
    assert {"sphinx_proof", "sphinx_exercise"} <= set(extensions), extensions
    requirements = (ROOT / "requirements.txt").read_text(encoding="utf-8")
    for package in ("sphinx-proof", "sphinx-exercise"):
        assert re.search(rf"^{package}\b", requirements, re.M), f"{package} missing in requirements.txt"


def test_instructor_guide_is_in_the_toc_and_covers_every_chapter():
    assert "book/instructor_guide" in toc_files(), "book/instructor_guide.md is not listed in _toc.yml"
    guide = (ROOT / "book" / "instructor_guide.md").read_text(encoding="utf-8")
    missing = [p.stem for p in CHAPTERS if p.stem not in guide]
    assert not missing, f"the instructor's guide has no section for: {missing}"
