"""The main job: ``python -m glmc_mini reproduce`` rebuilds the paper's Table 1 on the active profile.

For each task: train (or load cached) endpoints for every seed, form pairs of seeds (consecutive
seeds, plus first-last once there are three or more: seeds 0 1 2 give (0, 1), (1, 2), (0, 2)),
align every pair with every method and measure the test-loss barrier of the merge:

- ``barrier``: transformers merged in circuit form (the paper's reference); MLPs in stock form;
- ``barrier_stock``: the same method merged as stock-class models (None for MLPs);
- vanilla: the barrier of the raw models, for both.

Prints a table shaped like Table 1 (rows: methods, columns: tasks, "mean ± std" over pairs) and
returns / writes ``{task: {method: {"barrier", "barrier_std", "barrier_stock", "barrier_acc",
"loss_a", "loss_b", "seconds"}}}`` (means over pairs).
"""
import json
import statistics

from tqdm import tqdm

from .families import by_name

DEFAULT_TASKS = ("mlp-digits", "vit-digits", "gpt-pydoc")
PAPER_TASKS = ("vit-cifar10", "gpt-shakespeare")
# method key -> (gm.align method, symmetry classes)
METHODS = {
    "vanilla": ("none", ("perm", "orth", "inv")),
    "activation": ("activation", ("perm", "orth", "inv")),
    "weight": ("weight", ("perm", "orth", "inv")),
    "learned_perm": ("learned", ("perm",)),
    "learned": ("learned", ("perm", "orth", "inv")),
}
LABELS = {"vanilla": "vanilla averaging", "activation": "activation matching", "weight": "weight matching",
          "learned_perm": "learned, permutations only", "learned": "learned, all classes"}
LEARNED_STEPS = {"quick": 200, "standard": 300, "paper": 1000}
# test examples (images) / token windows used for the barrier, per profile (None: the whole split)
TEST_LIMIT = {"quick": (1024, 64), "standard": (4096, 256), "paper": (None, None)}


def default_tasks(profile):
    """The three embedded tasks, plus the paper's online tasks under ``profile="paper"``."""
    return DEFAULT_TASKS + (PAPER_TASKS if profile == "paper" else ())


def seed_pairs(seeds):
    """Consecutive pairs, closed into a ring once there are three or more seeds."""
    seeds = list(seeds)
    pairs = list(zip(seeds, seeds[1:]))
    if len(seeds) > 2:
        pairs.append((seeds[0], seeds[-1]))
    return pairs


def load_data(task, profile):
    """The task's TaskData, or None (with a message naming the task) if its data can't be had."""
    from .data import load_task
    try:
        return load_task(task, profile)
    except (OSError, RuntimeError) as err:
        print(f"skipping {task}: its data set is missing and could not be downloaded ({err})")
        return None


def test_batches(task_data, config, limit_batches=None):
    """A fixed list of test batches (the profile's example limit, or ``limit_batches`` batches)."""
    images, windows = TEST_LIMIT[config.profile]
    limit = windows if config.kind == "language" else images
    batches = list(task_data.loader("test", config.eval_batch_size, limit=limit))
    return batches[:limit_batches] if limit_batches else batches


def measure(model_a, model_b, method, test, train, steps, seed, form):
    """Align with one method in one form; the barrier curve of the merge and the alignment time."""
    from .align import align
    from .barrier import barrier
    name, classes = METHODS[method]
    res = align(model_a, model_b, method=name, symmetries=classes, data=train, steps=steps, seed=seed,
                form=form, progress=False)
    return barrier(res.model_a, res.model_b, test), res.seconds


def run_pair(models, config, method, test, train, steps, seed):
    """One row entry for one pair: circuit-form and stock-form barriers (MLPs: stock only)."""
    A, B = models
    transformer = by_name(config.family).supports("to_circuit")  # a circuit form to align in
    if method == "vanilla":
        from .barrier import barrier
        curve, seconds = barrier(A, B, test), 0.0
        stock = curve if transformer else None
    else:
        curve, seconds = measure(A, B, method, test, train, steps, seed, "circuit" if transformer else "stock")
        stock = measure(A, B, method, test, train, steps, seed, "stock")[0] if transformer else None
    return {"barrier": curve.barrier, "barrier_stock": None if stock is None else stock.barrier,
            "barrier_acc": curve.barrier_acc, "loss_a": curve.loss_a, "loss_b": curve.loss_b,
            "seconds": seconds}


def _mean(values):
    return None if any(v is None for v in values) else float(statistics.fmean(values))


def summarise(entries):
    """Means over pairs of each field, plus the population std of the barrier."""
    out = {key: _mean([e[key] for e in entries]) for key in entries[0]}
    out["barrier_std"] = float(statistics.pstdev([e["barrier"] for e in entries]))
    return out


def run_task(task, profile, seeds, steps=None, limit_batches=None, progress=True):
    """{method: summary} for one task, or None when its data is unavailable."""
    from .profiles import task_config
    from .train import get_trained
    config, task_data = task_config(task, profile), load_data(task, profile)
    if task_data is None:
        return None
    models = {s: get_trained(task, s, profile=profile, progress=progress) for s in seeds}
    test = test_batches(task_data, config, limit_batches)
    steps = steps or LEARNED_STEPS[profile]
    results = {m: [] for m in METHODS}
    jobs = [(pair, m) for pair in seed_pairs(seeds) for m in METHODS]
    for (a, b), method in tqdm(jobs, desc=task, disable=not progress):
        train = task_data.loader("train", config.batch_size, shuffle=True, seed=a, drop_last=True)
        results[method].append(run_pair((models[a], models[b]), config, method, test, train, steps, a))
    return {m: summarise(entries) for m, entries in results.items()}


def format_table(results):
    """Table 1's layout: methods as rows, tasks as columns, barrier "mean ± std" over pairs."""
    tasks = list(results)
    lines = ["| method | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for method, label in LABELS.items():
        cells = [f"{results[t][method]['barrier']:.2f} ± {results[t][method]['barrier_std']:.2f}" for t in tasks]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reproduce(profile, tasks=None, seeds=(0, 1), steps=None, json_path=None, limit_batches=None,
              progress=True):
    """Run every task and method, print the table, write JSON to ``json_path``; returns the results."""
    from .profiles import PROFILES, describe_profile
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    if len(seeds) < 2:
        raise ValueError("reproduce needs at least two seeds to form a pair")
    print(f"active profile: {profile}")
    print(describe_profile(profile=profile))
    results = {}
    for task in tasks or default_tasks(profile):
        out = run_task(task, profile, list(seeds), steps, limit_batches, progress)
        if out is not None:
            results[task] = out
    print("\nTest-loss barrier (nats, mean ± std over pairs; transformers merged in circuit form)")
    print(format_table(results) if results else "(no task ran)")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {json_path}")
    return results
