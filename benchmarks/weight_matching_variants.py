"""Why does weight matching end far from vanilla on some ViT pairs? Variants of it on given pairs.

    python benchmarks/weight_matching_variants.py [--task vit-digits] [--profile quick] [--width W]
                                                  [--pairs 0,1 2,3 ...] [--threads N]

Per pair (both endpoints canonicalized): the barrier of vanilla averaging, then of weight matching
(stock-form merge) with the default settings; with 1 and 10 restarts; with a tight stopping rule
(tol 1e-6, patience 4, up to 200 sweeps); with permutations only and with permutations and
orthogonal maps; with a weighted objective (every parameter tensor k weighted by
1 / (||A_k||^2 + ||B_k||^2), "each tensor equally", or by the inverse of its mean square, "per
entry": weight matching on copies of A and B whose tensors are scaled by the square root of the
weight, which the classes' linear actions turn into the weighted distance; norm gains unscaled, so
the copies stay canonical); and, for comparison, activation matching and learned matching with permutations
only (``--data-batches`` training batches, learned 100 steps). For each weight-matching variant:
its final distance ||A - T(B)||^2, also recomputed from the state dicts (the two must agree: the
solver's objective is the one the merge sees), and the barrier as a share of vanilla averaging's.
``--width`` changes the residual width as ``width_study.py`` does.
"""
import argparse
import sys
import time
from itertools import islice
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

VARIANTS = {
    "default": dict(),
    "1 restart": dict(restarts=1),
    "10 restarts": dict(restarts=10),
    "tight stop": dict(tol=1e-6, patience=4, max_iter=200),
    "perm only": dict(symmetries=("perm",)),
    "perm + orth": dict(symmetries=("perm", "orth")),
}


def scaled(model, weights):
    """A copy of ``model`` with parameter ``k`` multiplied by sqrt(weights[k])."""
    import copy
    import torch
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in weights:
                p.mul_(weights[name] ** 0.5)
    return model


def state_distance(model_a, model_b):
    sa, sb = model_a.state_dict(), model_b.state_dict()
    return sum(((sa[k].double() - sb[k].double()) ** 2).sum().item() for k in sa)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="vit-digits")
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--pairs", nargs="+", default=["0,1", "2,3", "4,5", "6,7", "8,9"])
    parser.add_argument("--data-batches", type=int, default=120)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    import torch
    import glmc_mini as gm
    from glmc_mini.matching import weight_matching
    from glmc_mini.reproduce import test_batches
    from width_study import with_width
    if args.threads:
        torch.set_num_threads(args.threads)
    config = gm.task_config(args.task, args.profile)
    if args.width:
        config = with_width(config, args.width)
    task_data = gm.load_task(args.task, args.profile)
    test = test_batches(task_data, config)
    for pair in [tuple(int(s) for s in p.split(",")) for p in args.pairs]:
        A, B = (gm.canonicalize(gm.get_trained(config, s, progress=False)) for s in pair)
        vanilla = gm.barrier(A, B, test).barrier
        print(f"pair {pair}: vanilla averaging {vanilla:.3f}; weight matching, stock-form merge:")
        for name, kw in VARIANTS.items():
            start = time.perf_counter()
            T, history = weight_matching(A, B, **kw)
            moved = gm.apply_transforms(B, T)
            value = gm.barrier(A, moved, test).barrier
            print(f"  {name:12s} barrier {value:.3f} ({value / vanilla:4.0%} of vanilla), distance "
                  f"{history[0]:.2f} -> {min(history):.2f} (recomputed {state_distance(A, moved):.2f}), "
                  f"{time.perf_counter() - start:.1f} s", flush=True)
        pa, pb = dict(A.named_parameters()), dict(B.named_parameters())
        weightings = {
            "each tensor equally": lambda k: 1.0 / ((pa[k] ** 2).sum() + (pb[k] ** 2).sum()).item(),
            "per entry": lambda k: 1.0 / ((pa[k] ** 2).mean() + (pb[k] ** 2).mean()).item(),
        }
        for name, weight in weightings.items():
            weights = {k: weight(k) for k in pa if "norm" not in k}
            T, _ = weight_matching(scaled(A, weights), scaled(B, weights))
            value = gm.barrier(A, gm.apply_transforms(B, T), test).barrier
            print(f"  weighted, {name:19s} barrier {value:.3f} ({value / vanilla:4.0%} of vanilla)", flush=True)
        train = list(islice(task_data.loader("train", config.batch_size, shuffle=True, seed=pair[0],
                                             drop_last=True), args.data_batches))
        for method in ("activation", "learned"):
            res = gm.align(A, B, method=method, symmetries=("perm",), data=train, steps=100, progress=False)
            value = gm.barrier(res.model_a, res.model_b, test).barrier
            print(f"  {method} matching, perm only: barrier {value:.3f} ({value / vanilla:4.0%} of vanilla)")


if __name__ == "__main__":
    main()
