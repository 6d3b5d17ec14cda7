"""Profiles: one switch (``GLMC_PROFILE``) and the task presets, quick / standard / paper side by side.

``quick`` is for CI and first contact (tiny models, each endpoint trains in seconds on 2 CPU
cores), ``standard`` (the default) is what the rendered book shows (about a minute or two per
endpoint on a laptop CPU), ``paper`` uses the model sizes of the paper's Table 2 and is meant for
a GPU. The sizes do not depend on the data, so ``paper`` sizes also run on the embedded tasks.

Every preset was measured on 2 CPU cores: two seeds of the same preset land in different basins,
so plain weight averaging shows a clear loss barrier (see ``describe_profile``).
"""
import dataclasses
import os
from dataclasses import dataclass, field

PROFILES = ("quick", "standard", "paper")
TASKS = ("mlp-digits", "mlp-relu-digits", "vit-digits", "gpt-pydoc", "llama-pydoc", "vit-cifar10", "gpt-shakespeare")


def get_profile():
    """The active profile, read from the environment variable ``GLMC_PROFILE`` (default "standard").

    Introduced in chapter 0.
    """
    profile = os.environ.get("GLMC_PROFILE", "standard").strip().lower() or "standard"
    if profile not in PROFILES:
        raise ValueError(f"GLMC_PROFILE={profile!r} is not a profile; choose one of {', '.join(PROFILES)}")
    return profile


def __getattr__(name):
    """``PROFILE``: the active profile, read when asked for (an invalid ``GLMC_PROFILE`` then fails
    where it is used, not at import, so ``python -m glmc_mini reproduce --profile quick`` still works)."""
    if name == "PROFILE":
        return get_profile()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class TaskConfig:
    """Everything that defines one endpoint model of a task (its hash keys the checkpoint cache)."""
    task: str                    # task name, one of TASKS
    profile: str                 # the profile this preset belongs to
    family: str                  # "mlp" | "vit" | "gpt2" | "llama" (families.by_name)
    dataset: str                 # "digits" | "pydoc" | "cifar10" | "shakespeare"
    model: dict = field(default_factory=dict)  # keyword arguments of the stock model (see models.build_model)
    epochs: int = 0              # passes over the training set (used when steps == 0)
    steps: int = 0               # optimiser steps; overrides epochs when > 0 (language models)
    batch_size: int = 64         # examples (images or token windows) per step
    lr: float = 1e-3             # peak AdamW learning rate
    weight_decay: float = 0.05   # AdamW weight decay (decoupled)
    warmup: float = 0.05         # fraction of the steps spent on linear warmup, then cosine decay to 0
    block_size: int = 0          # tokens per window (language tasks); 0 for images
    augment: bool = False        # random crop (pad 4) and horizontal flip on image batches
    eval_batch_size: int = 256   # batch size used for evaluation loaders
    seconds: float = 0.0         # expected training time of one endpoint (2 CPU cores; GPU for paper)

    @property
    def kind(self):
        """ "language" or "classification": the kind of the task's model family."""
        from .families import by_name
        return by_name(self.family).kind


def _mlp(act):
    # MLP on 8x8 digits: hidden widths; the quick/standard/paper presets differ only in width and epochs
    base = dict(family="mlp", dataset="digits", batch_size=64, lr=3e-3, weight_decay=0.0, warmup=0.05)
    model = lambda h: dict(in_features=64, hidden=[h, h], num_classes=10, act=act)
    return {
        "quick":    dict(base, model=model(64), epochs=60, seconds=2),
        "standard": dict(base, model=model(128), epochs=200, seconds=7),
        "paper":    dict(base, model=model(512), epochs=100, seconds=30),
    }


def _vit(dataset):
    # timm VisionTransformer, pre-norm, class token; embed_dim = width, mlp_ratio * width = MLP width
    img = dict(digits=dict(img_size=8, patch_size=2, in_chans=1), cifar10=dict(img_size=32, patch_size=4, in_chans=3))[dataset]
    vit = lambda d, L, H, f: dict(img, num_classes=10, embed_dim=d, depth=L, num_heads=H, mlp_ratio=f / d)
    base = dict(family="vit", dataset=dataset, batch_size=64, weight_decay=0.05, warmup=0.05)
    if dataset == "cifar10":  # the paper's online set (Table 2: 6 layers, 8 heads, width 256, MLP 512)
        base.update(batch_size=128, augment=True)
        return {
            "quick":    dict(base, model=vit(32, 2, 4, 64), epochs=2, lr=1e-3, seconds=120),
            "standard": dict(base, model=vit(64, 4, 4, 128), epochs=10, lr=1e-3, seconds=1200),
            "paper":    dict(base, model=vit(256, 6, 8, 512), epochs=150, lr=5e-4, seconds=3600),
        }
    return {
        "quick":    dict(base, model=vit(32, 2, 4, 64), epochs=40, lr=3e-3, seconds=15),
        "standard": dict(base, model=vit(64, 4, 4, 128), epochs=60, lr=2e-3, seconds=90),
        "paper":    dict(base, model=vit(256, 6, 8, 512), epochs=60, lr=5e-4, seconds=60),
    }


def _gpt(dataset):
    # Hugging Face GPT2LMHeadModel, byte-level (vocab 256), dropout 0; n_inner = FFN width
    gpt = lambda d, L, H, f: dict(vocab_size=256, n_embd=d, n_layer=L, n_head=H, n_inner=f, activation_function="gelu_new")
    base = dict(family="gpt2", dataset=dataset, batch_size=32, weight_decay=0.1, warmup=0.05, eval_batch_size=64)
    if dataset == "shakespeare":  # the paper's online set (Table 2: 6 layers, 4 heads, width 256, MLP 1024)
        return {
            "quick":    dict(base, model=gpt(64, 2, 4, 256), block_size=32, steps=600, lr=3e-3, seconds=20),
            "standard": dict(base, model=gpt(128, 4, 4, 512), block_size=64, batch_size=16, steps=1200, lr=2e-3, seconds=100),
            "paper":    dict(base, model=gpt(256, 6, 4, 1024), block_size=256, batch_size=64, steps=5000, lr=1e-3, seconds=900),
        }
    return {
        "quick":    dict(base, model=gpt(64, 2, 4, 256), block_size=32, steps=600, lr=3e-3, seconds=20),
        "standard": dict(base, model=gpt(128, 4, 4, 512), block_size=64, batch_size=16, steps=1200, lr=2e-3, seconds=100),
        "paper":    dict(base, model=gpt(256, 6, 4, 1024), block_size=256, batch_size=64, steps=3000, lr=1e-3, seconds=300),
    }


def _llama(dataset):
    # Hugging Face LlamaForCausalLM, byte-level (vocab 256): the GPT-2 preset's width, depth, query heads,
    # context and training, with 2 key-value heads (grouped-query attention) and a SwiGLU FFN of 2/3 the
    # GPT-2 FFN width rounded up to a multiple of 8 (three matrices instead of two: about the same size)
    llama = lambda d, L, H, f: dict(vocab_size=256, hidden_size=d, num_hidden_layers=L, num_attention_heads=H,
                                    num_key_value_heads=2, intermediate_size=f, hidden_act="silu", rope_theta=10000.0)
    base = dict(family="llama", dataset=dataset, batch_size=32, weight_decay=0.1, warmup=0.05, eval_batch_size=64)
    return {
        "quick":    dict(base, model=llama(64, 2, 4, 176), block_size=32, steps=600, lr=3e-3, seconds=25),
        "standard": dict(base, model=llama(128, 4, 4, 344), block_size=64, batch_size=16, steps=1200, lr=2e-3, seconds=120),
        "paper":    dict(base, model=llama(256, 6, 4, 688), block_size=256, batch_size=64, steps=3000, lr=1e-3, seconds=360),
    }


_PRESETS = {
    "mlp-digits": lambda: _mlp("gelu"),
    "mlp-relu-digits": lambda: _mlp("relu"),
    "vit-digits": lambda: _vit("digits"),
    "gpt-pydoc": lambda: _gpt("pydoc"),
    "llama-pydoc": lambda: _llama("pydoc"),
    "vit-cifar10": lambda: _vit("cifar10"),
    "gpt-shakespeare": lambda: _gpt("shakespeare"),
}


def task_config(task, profile=None):
    """The preset ``TaskConfig`` of ``task`` under ``profile`` (default: the active ``GLMC_PROFILE``).

    Introduced in chapter 0.
    """
    if task not in _PRESETS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    profile = get_profile() if profile is None else profile
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    return TaskConfig(task=task, profile=profile, **_PRESETS[task]()[profile])


def _sizes(config):
    """One line of model sizes, e.g. 'ViT width 64, 4 layers, 4 heads, MLP 128' (the family's ``describe``)."""
    from .families import by_name
    return by_name(config.family).describe(config)


def describe_profile(task=None, profile=None):
    """A short description of ``profile`` (default: the active one): sizes and expected runtime per
    endpoint.

    Introduced in chapter 0.
    """
    profile = get_profile() if profile is None else profile
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    tasks = [task] if task is not None else ["mlp-digits", "vit-digits", "gpt-pydoc"]
    where = "a GPU" if profile == "paper" else "2 CPU cores"
    lines = [f"profile {profile!r} (set GLMC_PROFILE to quick | standard | paper)"]
    from .train import seed_offset
    if seed_offset():
        lines.append(f"GLMC_SEED_OFFSET={seed_offset()}: every endpoint seed is shifted by it")
    for name in tasks:
        c = task_config(name, profile)
        length = f"{c.steps} steps" if c.steps else f"{c.epochs} epochs"
        lines.append(f"  {name}: {_sizes(c)}; {length};")
        lines.append(f"    about {c.seconds:.0f} s per endpoint on {where}")
    return "\n".join(lines)


def replace(config, **changes):
    """A copy of ``config`` with some fields changed (``dataclasses.replace``), e.g. fewer epochs."""
    return dataclasses.replace(config, **changes)
