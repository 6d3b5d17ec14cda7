"""One learned-matching step against one training step of the same endpoint (time and peak memory).

    python benchmarks/bench_learned_step.py [--tasks gpt-pydoc vit-digits] [--profile standard] [--threads N]

Models: the task's preset sizes (random init; the cost does not depend on the weights), two seeds,
canonicalized. Train step: one AdamW step of endpoint A on one training batch. Learned step: one
step of ``learned_matching`` (project, transform B, merge, forward, backward, Adam on the
projections, retraction) in stock form with all classes, on the same batch size. Each measurement
runs in its own subprocess so that peak memory (CUDA: max_memory_allocated; CPU: growth of max
RSS) is not masked by the other. Target: learned step <= 3x train step.
"""
import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def rss_mib():
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def setup(task, profile):
    import glmc_mini as gm
    config = gm.task_config(task, profile)
    device = gm.get_device(verbose=False)
    A = gm.canonicalize(gm.build_model(config, 0)).to(device)
    B = gm.canonicalize(gm.build_model(config, 1)).to(device)
    data = gm.load_task(task, profile).loader("train", config.batch_size, shuffle=True, drop_last=True)
    return config, device, A, B, [b for b, _ in zip(data, range(4))]


def train_steps(A, batches, config, n):
    from glmc_mini.models import batch_loss, model_kind
    opt = torch.optim.AdamW(A.parameters(), lr=1e-4)
    A.train()
    for i in range(n):
        loss, count, _ = batch_loss(A, batches[i % len(batches)], model_kind(A))
        opt.zero_grad()
        (loss / count).backward()
        opt.step()


def learned_steps(A, B, batches, n):
    from glmc_mini.learned import learned_matching
    from glmc_mini.spaces import build_spec
    from glmc_mini.symmetries import identity_transforms, Orthogonal
    spec = build_spec(A)
    init = {k: (Orthogonal.identity(s.size) if s.kind == "residual" else identity_transforms(spec)[k])
            for k, s in spec.spaces.items()}
    learned_matching(A, B, batches, init, steps=n, progress=False)


def measure(task, profile, what, n):
    """Seconds per step (after one warm-up step) and peak extra memory in MiB over the steps, in this process."""
    config, device, A, B, batches = setup(task, profile)
    run = (lambda k: train_steps(A, batches, config, k)) if what == "train" else (lambda k: learned_steps(A, B, batches, k))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss0 = rss_mib()  # peak memory counted from before the warm-up step (it holds the first allocations)
    run(1)  # warm-up (allocator, lazy init); not timed
    sync()
    start = time.perf_counter()
    run(n)
    sync()
    seconds = (time.perf_counter() - start) / n
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else rss_mib() - rss0
    return {"seconds": seconds, "peak_mib": peak, "device": str(device)}


def child(args):
    print(json.dumps(measure(args.task, args.profile, args.what, args.n)))


def spawn(task, profile, what, n, threads):
    cmd = [sys.executable, __file__, "--child", "--task", task, "--profile", profile, "--what", what, "--n", str(n)]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", nargs="+", default=["gpt-pydoc", "vit-digits"])
    parser.add_argument("--profile", default="standard")
    parser.add_argument("--n", type=int, default=5, help="timed steps (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--task")
    parser.add_argument("--what")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args)
    worst = 0.0
    for task in args.tasks:
        tr = spawn(task, args.profile, "train", args.n, args.threads)
        le = spawn(task, args.profile, "learned", args.n, args.threads)
        ratio = le["seconds"] / tr["seconds"]
        worst = max(worst, ratio)
        print(f"{task} ({args.profile}, {tr['device']}): train step {tr['seconds'] * 1e3:.1f} ms, "
              f"learned step {le['seconds'] * 1e3:.1f} ms, time ratio {ratio:.2f}x; peak extra memory "
              f"train {tr['peak_mib']:.0f} MiB, learned {le['peak_mib']:.0f} MiB, "
              f"ratio {le['peak_mib'] / max(tr['peak_mib'], 1e-9):.2f}x")
    print(f"worst time ratio {worst:.2f}x (target <= 3x): {'met' if worst <= 3 else 'MISSED'}")


if __name__ == "__main__":
    sys.exit(main())
