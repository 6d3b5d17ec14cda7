"""Barrier against width: vanilla averaging, weight matching and learned matching on endpoint pairs
of one task preset whose width alone changes (depth, heads, data and training fixed).

    python benchmarks/width_study.py --task vit-digits --widths 32 64 128 256 --pairs 0,1 2,3
                                     [--profile quick] [--methods vanilla weight learned]
                                     [--steps N] [--form stock|circuit] [--json out.json]
                                     [--figure out.png] [--train-factor F] [--lr LR]
    python benchmarks/width_study.py --plot vit.json gpt.json --figure out.png

The width is the residual width (``embed_dim`` of a ViT, ``n_embd`` of a GPT-2, ``hidden_size``
of a Llama), with the feed-forward width scaled with it as in the preset (ViT ``mlp_ratio``;
GPT-2 ``n_inner = 4 x width``; Llama ``intermediate_size`` in the preset's ratio) and the number
of heads kept (so heads get wider). Endpoints are trained once per (width, seed) and cached like
the book's (``gm.get_trained``). ``--train-factor`` multiplies the preset's training length
(epochs or steps; the study's training-length axis) and ``--lr`` replaces its learning rate (one
value, or one per width). Each method aligns one pair with the main job's classes
(``reproduce.METHODS``) and merges in ``--form`` (stock by default: what a user of stock models
gets); learned matching takes the profile's steps (``reproduce.LEARNED_STEPS``) unless ``--steps``.
Prints one row per width: the endpoints' mean test loss and, per method, the barrier of each
pair, their mean and its share of vanilla averaging's barrier; ``--figure`` plots the mean barrier against width, one curve per
method, with each pair's value as a dot. ``--plot`` draws that figure from studies saved with
``--json``, one panel per file side by side, and runs nothing.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def with_width(config, width):
    """``config`` with residual width ``width`` (feed-forward in the preset's ratio, heads kept)."""
    from glmc_mini.profiles import replace
    m = dict(config.model)
    if config.family == "vit":
        m["embed_dim"] = width
    elif config.family == "gpt2":
        m["n_inner"] = 4 * width if m.get("n_inner") is None else m["n_inner"] * width // m["n_embd"]
        m["n_embd"] = width
    elif config.family == "llama":
        m["intermediate_size"] = m["intermediate_size"] * width // m["hidden_size"]
        m["hidden_size"] = width
    else:
        raise SystemExit(f"width study: {config.task} is a {config.family} preset; use a ViT, GPT-2 or Llama task")
    return replace(config, model=m)


def with_training(config, factor=1.0, lr=None):
    """``config`` trained ``factor`` times as long (epochs or steps), with learning rate ``lr`` if given."""
    from glmc_mini.profiles import replace
    changes = {"steps": max(1, round(config.steps * factor))} if config.steps else \
        {"epochs": max(1, round(config.epochs * factor))}
    if lr is not None:
        changes["lr"] = lr
    return replace(config, **changes)


def measure(config, width, pair, methods, steps, form, test, task_data):
    """{method: barrier} of one pair (the main job's ``reproduce.measure``), plus the endpoints' mean test loss."""
    import glmc_mini as gm
    from glmc_mini.reproduce import measure as align_and_measure
    models = [gm.get_trained(config, s, progress=False) for s in pair]
    out = {}
    for method in methods:
        start = time.perf_counter()
        if method == "vanilla":
            curve = gm.barrier(*models, test)
            out["endpoint_loss"] = (curve.loss_a + curve.loss_b) / 2
        else:
            train = task_data.loader("train", config.batch_size, shuffle=True, seed=pair[0], drop_last=True)
            curve, _ = align_and_measure(*models, method, test, train, steps, pair[0], form)
        out[method] = curve.barrier
        print(f"  width {width:4d} pair {pair}: {method:12s} {out[method]:.3f} "
              f"({time.perf_counter() - start:.1f} s)", flush=True)
    return out


def table(results, methods):
    lines = ["| width | endpoint loss | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for width, per_pair in results.items():
        cells = [f"{statistics.fmean(p['endpoint_loss'] for p in per_pair.values()):.3f}"]
        for m in methods:
            vals = [p[m] for p in per_pair.values()]
            mean = statistics.fmean(vals)
            share = "" if m == "vanilla" else f" ({mean / statistics.fmean(p['vanilla'] for p in per_pair.values()):.0%})"
            cells.append(f"{mean:.2f}{share} [" + ", ".join(f"{v:.2f}" for v in vals) + "]")
        lines.append(f"| {width} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _panel(ax, results, methods, title):
    """Mean barrier against width, one curve per method, each pair's value as a dot."""
    from glmc_mini.reproduce import LABELS
    widths = [int(w) for w in results]
    for m in methods:
        means = [statistics.fmean(p[m] for p in per_pair.values()) for per_pair in results.values()]
        line, = ax.plot(widths, means, marker="o", label=LABELS[m])
        for w, per_pair in zip(widths, results.values()):
            ys = [p[m] for p in per_pair.values()]
            ax.scatter([w] * len(ys), ys, s=10, color=line.get_color(), alpha=0.5)
    ax.set_xscale("log", base=2)
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.set_xlabel("residual width")
    ax.set_ylabel("test-loss barrier (nats)")
    ax.set_title(title)


def plot(panels, methods, path):
    """One panel per (results, title), side by side, one legend below; saved to ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import glmc_mini as gm
    fig, axes = gm.plots.figure(len(panels), 1, width=4.6 * len(panels), height=3.4)
    axes = [axes] if len(panels) == 1 else list(axes)
    for ax, (results, title) in zip(axes, panels):
        _panel(ax, results, methods, title)
        gm.plots.style(ax, legend=len(panels) == 1)
    if len(panels) > 1:
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.01), ncol=len(labels),
                   frameon=False, fontsize=gm.plots.FONT)
    fig.savefig(path, dpi=150, bbox_inches="tight")


def title_of(saved):
    """A panel title from a saved study: task, profile, learning rate and training length."""
    extra = f", training x {saved['train_factor']:g}" if saved.get("train_factor", 1) != 1 else ""
    lr = saved["lr"]
    lr = f"lr {lr:g}" if not isinstance(lr, dict) else "lr per width"
    return f"{saved['task']} ({saved['profile']}, {lr}{extra})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="vit-digits")
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--pairs", nargs="+", default=["0,1", "2,3"])
    parser.add_argument("--methods", nargs="+", default=["vanilla", "weight", "learned"])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--form", choices=("stock", "circuit"), default="stock")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--train-factor", type=float, default=1.0, help="training length x F")
    parser.add_argument("--lr", type=float, nargs="+", default=None,
                        help="training learning rate: one for every width, or one per width (default: the preset's)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--figure", default=None)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--plot", nargs="+", default=None, metavar="JSON",
                        help="draw --figure from studies saved with --json (one panel each); run nothing")
    args = parser.parse_args()
    if args.plot:
        saved = [json.loads(Path(f).read_text()) for f in args.plot]
        methods = [m for m in ("vanilla", "weight", "learned_perm", "learned", "activation")
                   if m in next(iter(next(iter(saved[0]["results"].values())).values()))]
        plot([(s["results"], title_of(s)) for s in saved], methods, args.figure or "width_study.png")
        return
    import torch
    import glmc_mini as gm
    from glmc_mini.reproduce import LEARNED_STEPS, METHODS, test_batches
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    methods = ["vanilla"] + [m for m in args.methods if m != "vanilla"]
    pairs = [tuple(int(s) for s in p.split(",")) for p in args.pairs]
    lrs = args.lr or [None]
    if len(lrs) not in (1, len(args.widths)):
        raise SystemExit(f"--lr: give one learning rate or one per width ({len(args.widths)}), got {len(lrs)}")
    lrs = dict(zip(args.widths, lrs * len(args.widths) if len(lrs) == 1 else lrs))
    preset = gm.task_config(args.task, args.profile)
    base = with_training(preset, args.train_factor)
    task_data = gm.load_task(args.task, args.profile)
    test = test_batches(task_data, base)
    steps = args.steps or LEARNED_STEPS[args.profile]
    results, start = {}, time.perf_counter()
    for width in args.widths:
        config = with_width(with_training(preset, args.train_factor, lrs[width]), width)
        results[width] = {f"{a},{b}": measure(config, width, (a, b), methods, steps, args.form, test, task_data)
                          for a, b in pairs}
    lr = {w: lrs[w] or preset.lr for w in args.widths}
    lr = next(iter(lr.values())) if len(set(lr.values())) == 1 else {str(w): v for w, v in lr.items()}
    print(f"\n{args.task}, profile {args.profile} (training x {args.train_factor:g}, lr {lr}), "
          f"form {args.form}, learned steps {steps}, "
          f"{torch.get_num_threads()} threads, {time.perf_counter() - start:.0f} s; "
          "mean barrier (share of vanilla) [per pair]:")
    print(table(results, methods))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(task=args.task, profile=args.profile, form=args.form,
                                                   train_factor=args.train_factor, lr=lr,
                                                   steps=steps, pairs=args.pairs, results=results), indent=1))
    if args.figure:
        plot([(results, title_of(dict(task=args.task, profile=args.profile, lr=lr, form=args.form,
                                      train_factor=args.train_factor)))], methods, args.figure)


if __name__ == "__main__":
    main()
