"""Data-parallel learned matching (``glmc_mini.distributed``): two gloo processes on the CPU end with
the transforms of a one-process run on the same global batches, on every process, through the
Python API and through ``torchrun -m glmc_mini align``."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import glmc_mini as gm
from glmc_mini.distributed import shard

STEPS, BATCH = 5, 7   # 7 rows: shares of 4 and 3, so the loss weighting matters


def pair():
    from transformers import GPT2Config, GPT2LMHeadModel
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        cfg = GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
        models.append(GPT2LMHeadModel(cfg).eval())
    return models


def batches():
    """Two batches, repeated: the held-out ones (the first 4) are trained on too, so the loss they
    choose the iterate by falls and a moved iterate is returned."""
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 32, (BATCH, 16), generator=g) for _ in range(2)] * 3


def run_learned():
    torch.manual_seed(123)  # a different global RNG state per process must not matter
    A, B = pair()
    res = gm.align(A, B, method="learned", symmetries=("perm", "orth", "inv"), data=batches(), steps=STEPS, seed=0,
                   progress=False)
    state = {"losses": torch.tensor(res.losses)}
    for name, T in res.transforms.items():
        state[name] = T.out_matrix().detach().float()
        if hasattr(T, "perm"):
            state[name + ".perm"] = T.perm
    return state


def _worker(rank, size, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    try:
        torch.save(run_learned(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    one = run_learned()
    assert set(ranks[0]) == set(one) and any(k.endswith(".perm") for k in one)
    for key, ref in one.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), f"{key}: the two processes disagree"
        if key.endswith(".perm"):
            assert torch.equal(ranks[0][key], ref), f"{key}: another permutation than one process"
        else:
            assert (ranks[0][key] - ref).abs().max() <= 1e-5, f"{key}: {(ranks[0][key] - ref).abs().max():.2e}"
    init = gm.weight_matching(*[gm.canonicalize(m) for m in pair()], symmetries=("perm", "orth", "inv"))[0]
    moved = [k for k, T in init.items() if not torch.allclose(T.out_matrix().float(), one[k], atol=1e-4)]
    assert moved, "learned matching left every transform at its start: the test compares nothing"


def test_shard_splits_rows_and_weights_by_share():
    x, y = torch.arange(14).view(7, 2), torch.arange(7)
    parts = [shard((x, y), r, 2) for r in range(2)]
    assert [p[0][0].shape[0] for p in parts] == [4, 3] and [p[1] for p in parts] == [4 / 7, 3 / 7]
    assert torch.equal(torch.cat([p[0][1] for p in parts]), y)
    assert shard(x, 0, 1) == (x, 1.0)
    with pytest.raises(ValueError, match="cannot be split across 8 processes"):
        shard(x, 0, 8)


def test_distributed_true_needs_a_process_group():
    A, B = [gm.canonicalize(m) for m in pair()]
    init = gm.weight_matching(A, B, symmetries=("perm",))[0]
    with pytest.raises(ValueError, match="initialised process group"):
        gm.learned_matching(A, B, batches(), init, steps=1, distributed=True, progress=False)


def test_torchrun_align_command_matches_one_process(tmp_path):
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel
    for seed, name in ((0, "a"), (1, "b")):
        torch.manual_seed(seed)
        GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                   bos_token_id=None, eos_token_id=None)).save_pretrained(tmp_path / name)
    (tmp_path / "text.txt").write_text("a byte-level text for learned matching. " * 30)
    args = ["-m", "glmc_mini", "align", str(tmp_path / "a"), str(tmp_path / "b"), "--method", "learned", "--data",
            str(tmp_path / "text.txt"), "--steps", "3", "--batch-size", "5", "--seq-len", "16", "--device", "cpu",
            "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    for cmd, out in ((launcher, "two"), ([sys.executable], "one")):
        done = subprocess.run([*cmd, *args, "--out", str(tmp_path / out)], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
    two, one = (load_file(tmp_path / out / "model_b" / "model.safetensors") for out in ("two", "one"))
    for key, ref in one.items():
        assert (two[key] - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item()), key
