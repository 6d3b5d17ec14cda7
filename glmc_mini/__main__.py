"""Command line: ``python -m glmc_mini reproduce [--profile ...] [--tasks ...] [--seeds ...] [--json ...]``."""
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
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
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
