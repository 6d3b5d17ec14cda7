"""Command line.

    python -m glmc_mini reproduce [--profile ...] [--tasks ...] [--seeds ...] [--json ...]
    python -m glmc_mini align DIR_A DIR_B --out OUT [--method ...] [--t T] [--data FILE] ...
    torchrun --nproc_per_node N -m glmc_mini align ... --method learned   (data-parallel learned matching)
"""
import argparse
import os
import sys


def build_parser():
    from .profiles import PROFILES, TASKS
    parser = argparse.ArgumentParser(prog="python -m glmc_mini", description="glmc_mini command line")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("reproduce", help="rebuild the paper's Table 1 on the chosen profile")
    rep.add_argument("--profile", choices=PROFILES, default=None,
                     help="task presets (default: $GLMC_PROFILE, else standard)")
    rep.add_argument("--tasks", nargs="+", choices=TASKS, default=None,
                     help="tasks (default: mlp-digits vit-digits gpt-pydoc; + vit-cifar10 gpt-shakespeare "
                          "under --profile paper)")
    rep.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="endpoint seeds (at least two)")
    rep.add_argument("--steps", type=int, default=None,
                     help="learned-matching steps (default per profile: quick 100, standard 300, paper 1000)")
    rep.add_argument("--json", default=None, help="write the results to this JSON file")
    rep.add_argument("--test-batches", type=int, default=None, help=argparse.SUPPRESS)
    rep.add_argument("--threads", type=int, default=None,
                     help="CPU threads for torch (default: 1 under the quick profile, whose tiny models only "
                          "lose from intra-op threads on a shared machine; torch's default otherwise)")
    rep.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _align_parser(sub)
    return parser


def _align_parser(sub):
    from .align import CLASSES, METHODS
    from .learned import SCHEDULES
    al = sub.add_parser(
        "align", help="align two checkpoint directories (Hugging Face or timm) and write the results",
        description="Align the model in DIR_B onto the model in DIR_A and write to OUT: model_a (A in canonical "
                    "form, same function as A), model_b (B aligned onto it, same function as B), with --t also "
                    "merged ((1-t) model_a + t model_b), each in the input's format, and summary.json. "
                    "Under torchrun, learned matching runs data-parallel and process 0 writes.")
    al.add_argument("dir_a", metavar="DIR_A", help="model A: a Hugging Face model directory or a timm checkpoint "
                                                   "directory (config.json + model.safetensors)")
    al.add_argument("dir_b", metavar="DIR_B", help="model B, of the same architecture as A")
    al.add_argument("--out", required=True, help="new (or empty) output directory")
    al.add_argument("--method", choices=METHODS, default="weight", help="alignment method (default: weight)")
    al.add_argument("--symmetries", nargs="+", choices=CLASSES, default=["perm", "orth", "inv"],
                    help="symmetry classes (default: perm orth inv)")
    al.add_argument("--t", type=float, default=None, help="also write the merged model (1-t) A + t B, t in [0, 1]")
    al.add_argument("--data", default=None,
                    help="data for --method activation / learned: a text file for language models (tokenized "
                         "with DIR_A's tokenizer, else read as bytes), a .safetensors / .npz file with x and y "
                         "for classifiers")
    al.add_argument("--steps", type=int, default=None, help="learned-matching steps (default 200)")
    al.add_argument("--schedule", choices=SCHEDULES, default="constant",
                    help="learned matching's learning rates: held constant (default) or decayed to zero by a cosine")
    al.add_argument("--seed", type=int, default=0, help="seed of the solvers and of the data order (default 0)")
    al.add_argument("--batch-size", type=int, default=8, help="global batch size (default 8)")
    al.add_argument("--seq-len", type=int, default=None,
                    help="tokens per sequence for language models (default: min(128, the model's positions))")
    al.add_argument("--device", default=None,
                    help="device (default: cuda, or cuda:LOCAL_RANK under torchrun, when available; else cpu)")
    al.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return al


def align_main(args):
    """``python -m glmc_mini align``: exit code 0, or 2 with one line naming the cause on stderr."""
    import json
    from .checkpoints import CheckpointError, align_checkpoints, one_line
    from .distributed import init_from_env, local_device, world
    try:
        import torch
        device = torch.device(args.device) if args.device else local_device()
    except (RuntimeError, TypeError) as e:
        print(f"error: --device {args.device!r}: {one_line(e)}", file=sys.stderr)
        return 2
    for name in ("steps", "batch_size", "seq_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            print(f"error: --{name.replace('_', '-')} must be a positive integer, got {value}", file=sys.stderr)
            return 2
    created = init_from_env(device)
    rank = world()[0]
    try:
        summary = align_checkpoints(args.dir_a, args.dir_b, args.out, method=args.method,
                                    symmetries=tuple(args.symmetries), data=args.data, t=args.t, steps=args.steps,
                                    schedule=args.schedule, seed=args.seed, batch_size=args.batch_size,
                                    seq_len=args.seq_len,
                                    device=device, progress=not args.no_progress and rank == 0)
    except (CheckpointError, ValueError, TypeError) as e:  # UnsupportedModelError is a TypeError
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    finally:
        if created:
            import torch.distributed as dist
            dist.destroy_process_group()
    if rank == 0:
        keys = ("method", "processes", "distance_before", "distance_after", "seconds_align", "seconds_total")
        print(json.dumps({k: summary[k] for k in keys}))
        print(f"wrote {', '.join(summary['outputs'])} and summary.json to {args.out}")
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "align":
        return align_main(args)
    if len(args.seeds) < 2:
        build_parser().error("--seeds needs at least two seeds")
    if args.profile is not None:
        os.environ["GLMC_PROFILE"] = args.profile
    from .profiles import get_profile
    from .reproduce import reproduce
    profile = get_profile()
    threads = args.threads or (1 if profile == "quick" else None)
    if threads:
        import torch
        torch.set_num_threads(threads)
    reproduce(profile, tasks=args.tasks, seeds=args.seeds, steps=args.steps, json_path=args.json,
              limit_batches=args.test_batches, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
