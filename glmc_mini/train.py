"""Seeded training of endpoint models, and a cache that loads a checkpoint if present, else trains.

Checkpoints are self-describing (nanoGPT style): ``<cache>/<task>-<key>.safetensors`` holds the
weights, ``<task>-<key>.json`` beside it the config and seed that built them; ``key`` is a hash
of both. Nothing is ever unpickled.
"""
import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .models import batch_loss, build_model, model_kind

CHECKPOINT_FORMAT = 1  # bump when the file layout or the training recipe changes


def _optimizer(model, config):
    """AdamW; weight decay on matrices and embeddings (dim >= 2) only, not on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))


def lr_factor(step, total, warmup):
    """Linear warmup over ``warmup * total`` steps, then cosine decay: 0.5 (1 + cos(pi p)), p in [0, 1]."""
    n_warm = max(1, round(warmup * total))
    if step < n_warm:
        return (step + 1) / n_warm
    p = (step - n_warm) / max(1, total - n_warm)
    return 0.5 * (1.0 + math.cos(math.pi * p))


def _augment(x, generator):
    """Random crop (zero-pad 4, crop back) and horizontal flip, per image. Inputs: x [B, C, H, W]."""
    B, C, H, W = x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))  # (B, C, H+8, W+8)
    dy, dx = torch.randint(0, 9, (2, B), generator=generator, device=x.device)  # offsets per image
    b = torch.arange(B, device=x.device)[:, None, None]
    rows = (dy[:, None] + torch.arange(H, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(W, device=x.device))[:, None, :]  # (B, 1, W)
    out = padded[b, :, rows, cols].permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)
    flip = torch.rand(B, generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def _batches(loader):
    """Endless batches: epoch after epoch (the loader's seeded generator fixes every epoch's order)."""
    while True:
        yield from loader


def train_model(model, task_data, config, seed, device=None, progress=True):
    """Train ``model`` in place on ``task_data.train``: AdamW, warmup + cosine, grad clip 1.0.

    Loss: cross-entropy; for language models logits[:, :-1] against x[:, 1:]. Data order and
    augmentation are seeded by ``seed``, so the same seed gives identical weights on CPU with the
    same number of torch threads (float sums are split differently across thread counts, so
    weights trained with 1 and with 2 threads differ slightly; the cache key does not include it).
    ``device``: defaults to the model's device. Returns the model (train mode).
    Introduced in chapter 0.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device).train()
    kind = model_kind(model)
    loader = task_data.loader("train", config.batch_size, shuffle=True, seed=seed, drop_last=True)
    if len(loader) == 0:
        raise ValueError(f"the training split of {config.task!r} has fewer than batch_size={config.batch_size} "
                         "examples: nothing to train on (use a smaller batch size or more data)")
    total = config.steps or config.epochs * len(loader)
    optimizer = _optimizer(model, config)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, config.warmup))
    generator = torch.Generator(device=device).manual_seed(seed)
    bar = tqdm(range(total), desc=f"train {config.task} seed {seed}", disable=not progress, leave=False)
    batches, avg = _batches(loader), None
    for step in bar:
        batch = next(batches)
        if config.augment:
            batch = (_augment(batch[0].to(device), generator), batch[1])
        loss_sum, n, _ = batch_loss(model, batch, kind)
        loss = loss_sum / n
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        avg = loss.item() if avg is None else 0.95 * avg + 0.05 * loss.item()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{avg:.3f}")
    return model


def cache_dir():
    """Where checkpoints live: ``$GLMC_CACHE``, default ``~/.cache/glmc_mini``."""
    return Path(os.environ.get("GLMC_CACHE") or "~/.cache/glmc_mini").expanduser()


def _describe(config, seed):
    """The JSON-able record of what builds a checkpoint (the config, seed and format)."""
    return {"task": config.task, "config": dataclasses.asdict(config), "seed": seed, "format": CHECKPOINT_FORMAT}


def checkpoint_key(config, seed):
    """Short hex hash (12 digits, SHA-256) of the task, the full config, the seed and the format."""
    text = json.dumps(_describe(config, seed), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def _paths(config, seed):
    stem = cache_dir() / f"{config.task}-{checkpoint_key(config, seed)}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def _cached(config, seed):
    """True when both files exist and the JSON describes exactly this config and seed."""
    weights, meta = _paths(config, seed)
    if not (weights.exists() and meta.exists()):
        return False
    record = json.loads(meta.read_text())
    expected = json.loads(json.dumps(_describe(config, seed)))  # tuples -> lists, as stored
    return {k: record.get(k) for k in expected} == expected


def _save(model, config, seed, seconds):
    """Write weights then JSON, each to a temporary file renamed into place (atomic)."""
    from safetensors.torch import save_model
    weights, meta = _paths(config, seed)
    weights.parent.mkdir(parents=True, exist_ok=True)
    record = dict(_describe(config, seed), key=checkpoint_key(config, seed), train_seconds=round(seconds, 2))
    tmp = weights.with_name(f".{weights.name}.{os.getpid()}.tmp")
    save_model(model, str(tmp), metadata={"glmc": json.dumps(record, sort_keys=True)})
    os.replace(tmp, weights)
    tmp = meta.with_name(f".{meta.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, meta)


def get_trained(task, seed, profile=None, device=None, progress=True, retrain=False):
    """The endpoint model of ``task`` (a name or a TaskConfig) trained with ``seed``: loaded from the
    cache when present, else built, trained and saved. Returned in eval mode on ``device``
    (default ``gm.get_device()``); loading and training give identical weights.

    Introduced in chapter 0.
    """
    from safetensors.torch import load_model
    from .data import load_task
    from .device import get_device
    from .profiles import task_config
    config = task_config(task, profile) if isinstance(task, str) else task
    device = get_device() if device is None else torch.device(device)
    model = build_model(config, seed)
    if not retrain and _cached(config, seed):
        load_model(model, str(_paths(config, seed)[0]), device="cpu")
        return model.to(device).eval()
    start = time.perf_counter()
    train_model(model, load_task(config), config, seed, device=device, progress=progress)
    _save(model, config, seed, time.perf_counter() - start)
    return model.eval()
