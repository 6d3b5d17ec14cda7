"""Learned matching against its own settings: steps, the lambda sampling range, the two learning
rates and the batch size, one setting at a time around the defaults, on endpoint pairs of one task
preset.

    python benchmarks/learned_study.py --task vit-digits --profile standard --pairs 11,12 13,14
        [--steps 100 300 1000 3000] [--lam 0.5:0.5 0.4:0.6 0.2:0.8 0:1] [--lr 3e-3 1e-2 3e-2]
        [--lr-perm 0.02 0.05 0.15] [--batch 32 64 128] [--schedule constant cosine] [--set KEY=VALUE ...]
        [--form circuit|stock] [--repeats R] [--train-barrier] [--json out.json]

Each pair is brought together as ``gm.align(method="learned", form=...)`` does (canonical forms,
weight matching over all classes, then, in circuit form, the circuit models; then
``learned.learned_matching`` on training batches), with the weight-matching start computed once per
pair and shared by every setting. The defaults are the main job's: the profile's steps
(``reproduce.LEARNED_STEPS``), lambda ~ U(0.4, 0.6), lr 1e-2, lr_perm 0.05, the preset's batch size,
learning rates held constant (``--schedule cosine``: decayed to zero over the run).
An axis varies one setting; the others stay at their defaults (``--set`` changes a default, e.g.
``--set lr_perm=0.15 steps=1000``; an empty axis, e.g. ``--lam``, is left out). Prints, per axis,
the barrier of each pair (nats, the profile's test windows; with ``--train-barrier`` also on as
many training examples, the data learned matching trains on), their mean and the seconds of one
run; ``--repeats R`` runs each setting R times per pair, each with its own order of the training
batches and its own lambdas (the table then lists each run); ``--json`` keeps every run (written
after each, so a long study can be read while it runs).
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULTS = dict(lr=1e-2, lr_perm=0.05, lam="0.4:0.6", schedule="constant")


def lam_range(text):
    lo, hi = (float(v) for v in text.split(":"))
    return lo, hi


def start(model_a, model_b, form):
    """(A, B, weight-matching transforms) in ``form``: the steps of ``gm.align`` before learned matching."""
    from glmc_mini.canonical import canonicalize
    from glmc_mini.circuit import to_circuit
    from glmc_mini.matching import weight_matching
    A, B = canonicalize(model_a), canonicalize(model_b)
    T, _ = weight_matching(A, B, symmetries=("perm", "orth", "inv"), progress=False)
    if form == "circuit":
        T = {k: v for k, v in T.items() if not k.startswith(("qk.", "ov."))}
        A, B = to_circuit(A), to_circuit(B)
    return A, B, T


def training_examples(task_data, config):
    """The first training examples, as many as the profile's test examples (``reproduce.test_batches``),
    in evaluation batches: the data learned matching trains on, to compare its barrier there and on test."""
    from glmc_mini.reproduce import TEST_LIMIT
    images, windows = TEST_LIMIT[config.profile]
    return list(task_data.loader("train", config.eval_batch_size,
                                 limit=windows if config.kind == "language" else images))


def run(A, B, T, task_data, config, seed, test, setting):
    """The barrier after learned matching with ``setting`` (data order and lambdas from ``seed``), its
    seconds and B aligned."""
    from glmc_mini.barrier import barrier
    from glmc_mini.learned import learned_matching
    from glmc_mini.symmetries import apply_transforms
    train = task_data.loader("train", setting["batch"], shuffle=True, seed=seed, drop_last=True)
    t0 = time.perf_counter()
    T, _ = learned_matching(A, B, train, T, steps=setting["steps"], lr=setting["lr"],
                            lr_perm=setting["lr_perm"], lam_range=lam_range(setting["lam"]), seed=seed,
                            schedule=setting["schedule"], progress=False)
    seconds = time.perf_counter() - t0
    aligned = apply_transforms(B, T)
    return barrier(A, aligned, test).barrier, seconds, aligned


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="vit-digits")
    parser.add_argument("--profile", default="standard")
    parser.add_argument("--pairs", nargs="+", default=["11,12", "13,14"])
    parser.add_argument("--steps", type=int, nargs="*", default=[100, 300, 1000, 3000])
    parser.add_argument("--lam", nargs="*", default=["0.5:0.5", "0.4:0.6", "0.2:0.8", "0:1"])
    parser.add_argument("--lr", type=float, nargs="*", default=[3e-3, 1e-2, 3e-2])
    parser.add_argument("--lr-perm", type=float, nargs="*", default=[0.02, 0.05, 0.15])
    parser.add_argument("--schedule", nargs="*", default=["constant", "cosine"])
    parser.add_argument("--batch", type=int, nargs="*", default=None, help="default: preset / 2, x1, x2")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="change a default (steps, lam, lr, lr_perm, batch, schedule), e.g. lr_perm=0.15")
    parser.add_argument("--form", choices=("circuit", "stock"), default="circuit")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per setting and pair, each with its own data order and lambdas (seed: the "
                             "pair's first seed + 1000 r)")
    parser.add_argument("--train-barrier", action="store_true",
                        help="also the barrier on as many training examples as test examples (the first ones)")
    args = parser.parse_args()
    import torch
    import glmc_mini as gm
    from glmc_mini.barrier import barrier
    from glmc_mini.reproduce import LEARNED_STEPS, test_batches
    from glmc_mini.symmetries import apply_transforms
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats < 1:
        raise SystemExit(f"--repeats {args.repeats}: give at least 1")
    config = gm.task_config(args.task, args.profile)
    default = dict(DEFAULTS, steps=LEARNED_STEPS[args.profile], batch=config.batch_size)
    for item in args.set:
        key, value = item.split("=")
        if key not in default:
            raise SystemExit(f"--set {item}: choose a key from {sorted(default)}")
        default[key] = value if key == "lam" else type(default[key])(value)
    batches = args.batch if args.batch is not None else [config.batch_size // 2, config.batch_size,
                                                            config.batch_size * 2]
    axes = {"steps": args.steps, "lam": args.lam, "lr": args.lr, "lr_perm": args.lr_perm, "batch": batches,
            "schedule": args.schedule}
    settings = [("default", default)] + [(f"{axis}={v}", dict(default, **{axis: v}))
                                         for axis, values in axes.items() for v in values
                                         if v != default[axis]]
    task_data, pairs = gm.load_task(args.task, args.profile), [tuple(int(s) for s in p.split(",")) for p in args.pairs]
    test = test_batches(task_data, config)
    train_eval = training_examples(task_data, config) if args.train_barrier else None
    results = {"task": args.task, "profile": args.profile, "form": args.form, "default": default, "runs": {},
               "train_barrier": {}}

    def on_training_data(name, key, A, aligned):
        """The barrier of the same merge on ``train_eval`` (``--train-barrier``), kept and returned as text."""
        if train_eval is None:
            return ""
        b = barrier(A, aligned, train_eval).barrier
        results["train_barrier"].setdefault(name, {})[key] = b
        return f", on training data {b:.3f}"
    begin = time.perf_counter()
    for pair in pairs:
        models = [gm.get_trained(config, s, progress=False) for s in pair]
        key = f"{pair[0]},{pair[1]}"
        t0 = time.perf_counter()
        A, B, T = start(*models, args.form)
        aligned = apply_transforms(B, T)
        wm = barrier(A, aligned, test).barrier
        results["runs"].setdefault("vanilla", {})[key] = (gm.barrier(*models, test).barrier, 0.0)
        results["runs"].setdefault("weight", {})[key] = (wm, time.perf_counter() - t0)
        print(f"pair {key}: vanilla {results['runs']['vanilla'][key][0]:.3f}, weight {wm:.3f}"
              + on_training_data("weight", key, A, aligned), flush=True)
        for name, setting in settings:
            for r in range(args.repeats):
                run_key = key if r == 0 else f"{key} order {r}"
                b, s, aligned = run(A, B, T, task_data, config, pair[0] + 1000 * r, test, setting)
                results["runs"].setdefault(name, {})[run_key] = (b, s)
                print(f"pair {run_key}: {name:16s} {b:.3f} ({s:.0f} s)"
                      + on_training_data(name, run_key, A, aligned), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"\n{args.task}, profile {args.profile}, {args.form} form, {torch.get_num_threads()} threads, "
          f"{time.perf_counter() - begin:.0f} s; defaults {default}")
    print("| setting | mean barrier | per pair | seconds per run |\n|---|---|---|---|")
    for name, per_pair in results["runs"].items():
        vals = [v[0] for v in per_pair.values()]
        print(f"| {name} | {statistics.fmean(vals):.3f} | " + ", ".join(f"{v:.3f}" for v in vals)
              + f" | {statistics.fmean(v[1] for v in per_pair.values()):.0f} |")


if __name__ == "__main__":
    main()
