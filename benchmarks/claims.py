"""Claims check: does every ``assert`` in every chapter hold on other endpoints?

A chapter's ``assert`` is a claim to every reader, and every reader trains other endpoints (another
CPU's kernels, a GPU, another torch thread count). This script executes every chapter under the
``quick`` profile (``--profile``) once per run, each run with its own ``GLMC_SEED_OFFSET`` (so ``gm.get_trained``
trains other endpoints) and its own torch thread count, and reports for each ``assert`` in how many
runs it held.

Each code cell is rewritten before it runs: ``assert cond, msg`` becomes a call that records
whether ``cond`` was true (and ``msg`` when it was not) and carries on, so one failing claim does
not hide the ones after it. An assert inside a loop or function counts as held in a run only if
every evaluation in that run was true; one never reached (an earlier error) counts as not held.

Usage (about 3-4 minutes per run on 2 cores, endpoints trained once per offset and thread count)::

    python benchmarks/claims.py --offsets 1 2 3 4 5 6 --threads 1 2 --jobs 2
    python benchmarks/claims.py --notebooks notebooks/02_semi_permutations.ipynb --offsets 1 2
    python benchmarks/claims.py --from-json claims.json claims-ch2.json --markdown

Runs pair offsets with thread counts in turn (offset 1 -> 1 thread, 2 -> 2 threads, ...);
single-thread runs go ``--jobs`` at a time, the others one at a time afterwards. Prints a
table (chapter, cell, assert, held/runs) and writes every record to ``--json``; ``--markdown``
prints the table as Markdown for ``benchmarks/README.md``. Exits 1 if any claim failed in any run.
"""
import argparse
import ast
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Defined in the kernel before the chapter's first cell.
PRELUDE = """
import json as _claims_json, torch as _claims_torch
_claims_torch.set_num_threads({threads})
__claims__ = {{}}
def __claim__(key, value, msg=None):
    held = bool(value)
    entry = __claims__.setdefault(key, {{"held": True, "evaluations": 0, "message": None}})
    entry["evaluations"] += 1
    if not held:
        entry["held"] = False
        if entry["message"] is None:
            entry["message"] = str(msg() if callable(msg) else msg)[:300]
    return held
"""
EPILOGUE = """
with open({path!r}, "w") as _f:
    _claims_json.dump(__claims__, _f)
"""


class _Asserts(ast.NodeTransformer):
    """Rewrites ``assert test, msg`` into ``__claim__(key, test, lambda: msg)``; keeps each assert's text."""

    def __init__(self, source, prefix):
        self.source, self.prefix, self.found = source, prefix, {}

    def visit_Assert(self, node):
        key = f"{self.prefix}:{node.lineno}"
        self.found[key] = " ".join(ast.get_source_segment(self.source, node).split())
        body = node.msg if node.msg is not None else self._operands(node.test)
        msg = ast.Lambda(args=ast.arguments(posonlyargs=[], args=[], kwonlyargs=[], kw_defaults=[], defaults=[]),
                         body=body)
        call = ast.Call(func=ast.Name("__claim__", ast.Load()), args=[ast.Constant(key), node.test, msg],
                        keywords=[])
        return ast.copy_location(ast.Expr(call), node)

    @staticmethod
    def _operands(test):
        """Without a message, a failed claim reports the operands of its comparisons (evaluated again)."""
        parts = [p for c in ast.walk(test) if isinstance(c, ast.Compare) for p in (c.left, *c.comparators)
                 if not isinstance(p, ast.Constant)]
        return ast.Tuple(parts, ast.Load()) if parts else ast.Constant(None)


def _python(source):
    """The cell as plain Python (IPython's own transformer turns ``!cmd`` and ``%magic`` into calls)."""
    from IPython.core.inputtransformer2 import TransformerManager
    return TransformerManager().transform_cell(source)


def instrument(nb, chapter):
    """Rewrite every assert in ``nb``'s code cells; returns {key: assert text}."""
    found = {}
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or "assert" not in cell.source:
            continue
        source = _python(cell.source)
        rewriter = _Asserts(source, f"{chapter}:cell{index}")
        tree = ast.fix_missing_locations(rewriter.visit(ast.parse(source)))
        cell.source = ast.unparse(tree)
        found.update(rewriter.found)
    return found


def run_chapter(path, threads, out_json, timeout=900):
    """Execute one instrumented chapter in a fresh kernel; returns ({key: text}, {key: record}, errors)."""
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(path, as_version=4)
    chapter = Path(path).stem
    found = instrument(nb, chapter)
    nb.cells.insert(0, nbformat.v4.new_code_cell(PRELUDE.format(threads=threads)))
    nb.cells.append(nbformat.v4.new_code_cell(EPILOGUE.format(path=str(out_json))))
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(Path(path).parent)}})
    client.execute()
    errors = [f"{chapter}:cell{i - 1}: {o.ename}: {o.evalue}"[:300] for i, c in enumerate(nb.cells)
              if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    records = json.loads(Path(out_json).read_text()) if Path(out_json).exists() else {}
    return found, records, errors


def single_run(notebooks, offset, threads, out):
    """One run: every chapter with GLMC_SEED_OFFSET=offset and ``threads`` torch threads (child process)."""
    result = {"offset": offset, "threads": threads, "asserts": {}, "records": {}, "errors": [], "seconds": {}}
    for path in notebooks:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            found, records, errors = run_chapter(path, threads, Path(tmp) / "claims.json")
        result["asserts"].update(found)
        result["records"].update(records)
        result["errors"] += errors
        result["seconds"][Path(path).stem] = round(time.perf_counter() - start, 1)
        print(f"[claims] offset {offset} threads {threads}: {Path(path).stem} "
              f"{result['seconds'][Path(path).stem]} s, {len(errors)} error(s)", flush=True)
    Path(out).write_text(json.dumps(result, indent=1))


def _launch(notebooks, offset, threads, cache, out, profile="quick"):
    env = dict(os.environ, GLMC_PROFILE=profile, GLMC_SEED_OFFSET=str(offset), GLMC_CACHE=str(cache),
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, __file__, "--single", str(offset), str(threads), str(out), *map(str, notebooks)]
    return subprocess.run(cmd, env=env, cwd=ROOT).returncode


def summarise(runs):
    """Rows (chapter, cell, text, held, runs, failures) in notebook order."""
    texts = {}
    for run in runs:
        texts.update(run["asserts"])
    rows = []
    for key, text in texts.items():
        chapter, cell, _ = key.split(":")
        held = [r["records"].get(key, {}).get("held", False) for r in runs]
        failures = [f"offset {r['offset']} / {r['threads']} thr: "
                    + (r["records"][key]["message"] or "false" if key in r["records"] else "not reached")
                    for r, h in zip(runs, held) if not h]
        rows.append((chapter, int(cell[4:]), text, sum(held), len(runs), failures))
    return sorted(rows, key=lambda r: (r[0], r[1]))


def combine(recordings):
    """Runs of several recordings merged by (offset, threads); a later recording's chapters win."""
    merged = {}
    for runs in recordings:
        for run in runs:
            key = (run["offset"], run["threads"])
            chapters = {k.split(":")[0] for k in run["asserts"]}
            base = merged.setdefault(key, {**run, "asserts": {}, "records": {}, "errors": []})
            keep = lambda d: {k: v for k, v in d.items() if k.split(":")[0] not in chapters}
            base["asserts"] = {**keep(base["asserts"]), **run["asserts"]}
            base["records"] = {**keep(base["records"]), **run["records"]}
    return list(merged.values())


def print_table(rows, markdown=False):
    if markdown:
        print("| chapter | cell | claim | held |\n|---|---|---|---|")
    for chapter, cell, text, held, n, failures in rows:
        short = text if len(text) <= 90 else text[:87] + "..."
        if markdown:
            cell_text = short.replace("|", "\\|")
            print(f"| {chapter} | {cell} | `{cell_text}` | {held}/{n} |")
        else:
            print(f"{held:>2}/{n:<2} {chapter} cell {cell:>2}  {short}")
            for failure in failures:
                print(f"        {failure}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--notebooks", nargs="+", default=None, help="chapters (default: notebooks/[0-9]*.ipynb)")
    parser.add_argument("--offsets", nargs="+", type=int, default=[1, 2, 3, 4, 5, 6])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="cycled over the offsets")
    parser.add_argument("--jobs", type=int, default=1, help="runs executed at once")
    parser.add_argument("--profile", default="quick", choices=("quick", "standard", "paper"),
                        help="GLMC_PROFILE of every run (default quick)")
    parser.add_argument("--cache", default=str(ROOT / ".glmc_cache" / "claims"), help="checkpoint cache root")
    parser.add_argument("--json", default=str(ROOT / ".glmc_cache" / "claims.json"),
                        help="where to write every record")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--from-json", nargs="+", default=None, metavar="JSON",
                        help="print the table of recorded runs instead of running; a later file's "
                             "chapters replace an earlier file's (same offsets and thread counts)")
    parser.add_argument("--single", nargs=3, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.single:
        offset, threads, out = args.single
        return single_run(rest, int(offset), int(threads), out)
    if args.from_json:
        runs = combine([json.loads(Path(p).read_text())["runs"] for p in args.from_json])
        rows = summarise(runs)
        print_table(rows, args.markdown)
        return 0 if all(r[3] == r[4] for r in rows) else 1
    notebooks = args.notebooks or sorted(str(p) for p in (ROOT / "notebooks").glob("[0-9]*.ipynb"))
    plan = [(o, args.threads[i % len(args.threads)]) for i, o in enumerate(args.offsets)]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        outs = [Path(tmp) / f"run-{o}-{t}.json" for o, t in plan]
        # one cache per thread count: the thread count changes the trained weights, not the cache key
        launch = lambda o, t, out: _launch(notebooks, o, t, Path(args.cache) / f"threads-{t}", out,
                                           args.profile)
        # single-thread runs share the machine (--jobs at once); a multi-thread run gets it alone
        # (two 2-thread runs on 2 cores oversubscribe them, which slows torch down many times)
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            codes = {o: pool.submit(launch, o, t, out) for (o, t), out in zip(plan, outs) if t == 1}
            codes = {o: f.result() for o, f in codes.items()}
        codes.update({o: launch(o, t, out) for (o, t), out in zip(plan, outs) if t != 1})
        codes = [codes[o] for o, _ in plan]
        runs = [json.loads(out.read_text()) for out in outs if out.exists()]
    if any(codes) or len(runs) != len(plan):
        print(f"[claims] {len(plan) - len(runs)} run(s) did not finish (exit codes {codes})")
    rows = summarise(runs)
    done = ", ".join(f"{r['offset']}/{r['threads']}" for r in runs)
    print(f"\n[claims] {len(runs)} runs (offset/threads: {done}), {time.perf_counter() - start:.0f} s")
    print_table(rows, args.markdown)
    for run in runs:
        for error in run["errors"]:
            print(f"[claims] error in offset {run['offset']} / {run['threads']} threads: {error}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"runs": runs}, indent=1))
    failed = [r for r in rows if r[3] < r[4]] or any(run["errors"] for run in runs) or len(runs) != len(plan)
    print(f"[claims] {sum(r[3] == r[4] for r in rows)} of {len(rows)} claims held in every run")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
