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


class _Batches:
    """Endless batches, epoch after epoch (the loader's seeded generator fixes every epoch's order),
    that can say where they are and start again from there: the generator's state at the start of
    the current epoch plus the number of batches taken from it."""

    def __init__(self, loader, epoch_rng=None, taken=0):
        self.loader, self.epoch_rng, self.taken = loader, epoch_rng, taken

    def __iter__(self):
        while True:
            if self.epoch_rng is not None:
                self.loader.generator.set_state(self.epoch_rng)   # replay this epoch's order
            self.epoch_rng = self.loader.generator.get_state()
            skip, self.taken = self.taken, 0
            for i, batch in enumerate(self.loader):
                if i >= skip:
                    self.taken = i + 1
                    yield batch
            self.epoch_rng, self.taken = None, 0


def _partial_paths(stem):
    return Path(f"{stem}.partial.safetensors"), Path(f"{stem}.partial.json")


def _save_partial(stem, step, model, optimizer, schedule, stream, generator):
    """A resumable snapshot after ``step`` steps: weights, AdamW moments, schedule, data position and
    augmentation RNG (tensors in safetensors, the rest in JSON; each file written atomically)."""
    from safetensors.torch import save_file
    weights, meta = _partial_paths(stem)
    opt = optimizer.state_dict()
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"opt.{i}.{k}": v.contiguous() for i, st in opt["state"].items() for k, v in st.items()})
    tensors.update({"rng.epoch": stream.epoch_rng, "rng.augment": generator.get_state()})
    record = {"step": step, "taken": stream.taken, "schedule": schedule.state_dict(),
              "param_groups": opt["param_groups"]}
    weights.parent.mkdir(parents=True, exist_ok=True)
    for path, write in ((weights, lambda t: save_file({k: v.cpu() for k, v in tensors.items()}, str(t))),
                        (meta, lambda t: t.write_text(json.dumps(record)))):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        write(tmp)
        os.replace(tmp, path)


def _load_partial(stem, model, optimizer, schedule, generator, device):
    """Restore what ``_save_partial`` wrote; returns (step, epoch_rng, batches taken) or None if absent."""
    from safetensors.torch import load_file
    weights, meta = _partial_paths(stem)
    if not (weights.exists() and meta.exists()):
        return None
    tensors, record = load_file(str(weights)), json.loads(meta.read_text())
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value.to(device) if value.dim() else value
    optimizer.load_state_dict({"state": state, "param_groups": record["param_groups"]})
    schedule.load_state_dict(record["schedule"])
    generator.set_state(tensors["rng.augment"])
    return record["step"], tensors["rng.epoch"], record["taken"]


def train_model(model, task_data, config, seed, device=None, progress=True, checkpoint=None,
                checkpoint_seconds=300.0):
    """Train ``model`` in place on ``task_data.train``: AdamW, warmup + cosine, grad clip 1.0.

    Loss: cross-entropy; for language models logits[:, :-1] against x[:, 1:]. Data order and
    augmentation are seeded by ``seed``, so the same seed gives identical weights on CPU with the
    same number of torch threads (float sums are split differently across thread counts, so
    weights trained with 1 and with 2 threads differ slightly; the cache key does not include it).
    ``device``: defaults to the model's device. ``checkpoint``: a path stem; when given, a
    resumable snapshot (``<stem>.partial.safetensors`` + ``.json``) is written every
    ``checkpoint_seconds`` and training resumes from it when it exists, ending with the weights an
    uninterrupted run gives. Returns the model (train mode).
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
    stream, first = _Batches(loader), 0
    resumed = checkpoint is not None and _load_partial(checkpoint, model, optimizer, schedule, generator, device)
    if resumed:
        first, epoch_rng, taken = resumed
        stream = _Batches(loader, epoch_rng, taken)
    bar = tqdm(range(first, total), desc=f"train {config.task} seed {seed}", disable=not progress,
               leave=False, initial=first, total=total)
    batches, avg, saved = iter(stream), None, time.perf_counter()
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
        if checkpoint is not None and step + 1 < total and time.perf_counter() - saved >= checkpoint_seconds:
            _save_partial(checkpoint, step + 1, model, optimizer, schedule, stream, generator)
            saved = time.perf_counter()
    return model


def cache_dir():
    """Where checkpoints live: ``$GLMC_CACHE``, default ``~/.cache/glmc_mini``."""
    return Path(os.environ.get("GLMC_CACHE") or "~/.cache/glmc_mini").expanduser()


def seed_offset():
    """``GLMC_SEED_OFFSET`` (an integer, default 0), added to every endpoint seed that ``get_trained``
    trains or loads, so the whole book can be re-run on other endpoints: a claim a chapter asserts
    must hold for any offset, not just the endpoints it was written on (``benchmarks/claims.py``).

    Introduced in chapter 0.
    """
    text = os.environ.get("GLMC_SEED_OFFSET", "").strip() or "0"
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"GLMC_SEED_OFFSET={text!r} is not an integer") from None


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
    record = dict(_describe(config, seed), key=checkpoint_key(config, seed), train_seconds=round(seconds, 2),
                  torch_threads=torch.get_num_threads(), device=str(next(model.parameters()).device))
    tmp = weights.with_name(f".{weights.name}.{os.getpid()}.tmp")
    save_model(model, str(tmp), metadata={"glmc": json.dumps(record, sort_keys=True)})
    os.replace(tmp, weights)
    tmp = meta.with_name(f".{meta.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, meta)


def get_trained(task, seed, profile=None, device=None, progress=True, retrain=False):
    """The endpoint model of ``task`` (a name or a TaskConfig) trained with ``seed`` plus
    ``GLMC_SEED_OFFSET`` (``seed_offset()``, default 0): loaded from the cache when present, else
    built, trained and saved; a long training leaves a resumable snapshot every 5 minutes that a
    later call picks up (keep ``GLMC_CACHE`` on a drive that outlives the session, e.g. Google
    Drive on Colab). The JSON beside the weights records the torch thread count and the
    device it was trained with (both change the trained weights). Returned in eval mode on
    ``device`` (default ``gm.get_device()``); loading and training give identical weights.

    Introduced in chapter 0.
    """
    from safetensors.torch import load_model
    from .data import load_task
    from .device import get_device
    from .profiles import task_config
    config = task_config(task, profile) if isinstance(task, str) else task
    seed = seed + seed_offset()
    device = get_device() if device is None else torch.device(device)
    model = build_model(config, seed)
    if not retrain and _cached(config, seed):
        load_model(model, str(_paths(config, seed)[0]), device="cpu")
        return model.to(device).eval()
    start, stem = time.perf_counter(), _paths(config, seed)[0].with_suffix("")
    if retrain:
        for path in _partial_paths(stem):
            path.unlink(missing_ok=True)
    train_model(model, load_task(config), config, seed, device=device, progress=progress, checkpoint=stem)
    _save(model, config, seed, time.perf_counter() - start)
    for path in _partial_paths(stem):
        path.unlink(missing_ok=True)
    return model.eval()
