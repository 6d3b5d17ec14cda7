"""Weight matching on two GPT-2-small-sized models (random weights, randomised LayerNorm gains).

    python benchmarks/bench_weight_matching.py [--vocab 50257] [--layers 12] [--width 768] [--threads N]

Canonicalizes both models, times ``gm.align(method="weight")`` (seconds, sweeps), measures peak
memory (CUDA: max_memory_allocated; CPU: growth of the process's max RSS) and checks that B's
function is preserved (max relative logit difference of the aligned B against B). Device: CUDA
when available, else CPU. Prints the load average before and after: other jobs on the machine
slow a CPU run down (record it with the figures).
"""
import argparse
import os
import resource
import sys
import time

import torch


def build(seed, args, device):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=args.vocab, n_positions=128, n_embd=args.width, n_layer=args.layers,
                     n_head=args.width // 64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.05)
    return model.to(device).eval()


def rss_mib():
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def logits(model, x):
    from glmc_mini.models import forward_logits
    with torch.no_grad():
        return forward_logits(model, x).float()


def main():
    import glmc_mini as gm
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = gm.get_device()
    A, B = build(0, args, device), build(1, args, device)
    A, B = gm.canonicalize(A), gm.canonicalize(B)
    params = sum(p.numel() for p in A.parameters())
    print(f"GPT-2 width {args.width}, {args.layers} layers, vocab {args.vocab}: {params / 1e6:.1f} M parameters, "
          f"device {device}, {torch.get_num_threads()} threads")
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    load0 = os.getloadavg()
    rss0 = rss_mib()
    res = gm.align(A, B, method="weight", progress=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = rss_mib() - rss0
    model_mib = params * 4 / 2**20
    x = torch.randint(0, args.vocab, (2, 64), generator=torch.Generator().manual_seed(0)).to(device)
    ref, got = logits(B, x), logits(res.model_b, x)
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    print(f"weight matching: {res.seconds:.1f} s, {len(res.history) - 1} sweeps, "
          f"||A - T(B)||^2 {res.history[0]:.4g} -> {res.history[-1]:.4g}")
    print(f"peak extra memory: {peak:.0f} MiB = {peak / model_mib:.2f} x one model ({model_mib:.0f} MiB)")
    print(f"B's function preserved: max relative logit difference {rel:.2e}")
    print("load average (1, 5, 15 min): before " + " ".join(f"{x:.2f}" for x in load0) +
          ", after " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    return 0 if rel < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
