"""Weight matching on two GPT-2-small-sized models (random weights, randomised LayerNorm gains), or
on two Llama-style decoders of SmolLM-135M's size (``--family llama``: width 576, 30 layers, 9 query
and 3 key-value heads, SwiGLU 1536, vocabulary 49152, tied embeddings; randomised RMSNorm gains).

    python benchmarks/bench_weight_matching.py [--family gpt2|llama] [--vocab V] [--layers L] [--width D]
                                               [--threads N]

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
    if args.family == "llama":
        return build_llama(seed, args, device)
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


def build_llama(seed, args, device):
    """SmolLM-135M's configuration (head size 64, 3 query heads per key-value head), random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.width, intermediate_size=args.ffn,
                      num_hidden_layers=args.layers, num_attention_heads=args.width // 64, num_key_value_heads=3,
                      max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
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
    parser.add_argument("--family", choices=("gpt2", "llama"), default="gpt2")
    parser.add_argument("--vocab", type=int, default=None, help="50257 (gpt2), 49152 (llama)")
    parser.add_argument("--layers", type=int, default=None, help="12 (gpt2), 30 (llama)")
    parser.add_argument("--width", type=int, default=None, help="768 (gpt2), 576 (llama)")
    parser.add_argument("--ffn", type=int, default=1536, help="SwiGLU width (llama)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    defaults = dict(gpt2=(50257, 12, 768), llama=(49152, 30, 576))[args.family]
    for key, value in zip(("vocab", "layers", "width"), defaults):
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = gm.get_device()
    A, B = build(0, args, device), build(1, args, device)
    A, B = gm.canonicalize(A), gm.canonicalize(B)
    params = sum(p.numel() for p in A.parameters())
    name = "GPT-2" if args.family == "gpt2" else "Llama (SmolLM-135M size)"
    print(f"{name} width {args.width}, {args.layers} layers, vocab {args.vocab}: {params / 1e6:.1f} M parameters, "
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
