"""Stock endpoint models: an ``nn.Sequential`` MLP, timm's ``VisionTransformer``, Hugging Face's
``GPT2LMHeadModel``; plus the two questions every other module asks of a model: which family it
belongs to, and how to get its logits."""
import sys

import torch
from torch import nn

KINDS = ("classification", "language")
_ACTS = {"gelu": nn.GELU, "relu": nn.ReLU}


def _mlp(in_features, hidden, num_classes, act="gelu"):
    """Flatten -> (Linear -> act) per hidden width -> Linear."""
    layers, width = [nn.Flatten()], in_features
    for h in hidden:
        layers += [nn.Linear(width, h), _ACTS[act]()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, num_classes))


def _vit(**kwargs):
    """timm VisionTransformer (pre-norm, class token, no dropout) with the preset's sizes."""
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(class_token=True, global_pool="token", **kwargs)


def _gpt2(block_size, **kwargs):
    """Hugging Face GPT2LMHeadModel with context ``block_size`` and every dropout set to 0."""
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(n_positions=block_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=None, eos_token_id=None, **kwargs)  # byte-level: no special tokens
    return GPT2LMHeadModel(config)


def build_model(task_or_config, seed=0):
    """A freshly initialised stock model for a task name or a ``TaskConfig``; init seeded by ``seed``.

    The global RNG state of the caller is left as it was. Introduced in chapter 0.
    """
    from .profiles import task_config
    config = task_config(task_or_config) if isinstance(task_or_config, str) else task_or_config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if config.family == "mlp":
            return _mlp(**config.model)
        if config.family == "vit":
            return _vit(**config.model)
        if config.family == "gpt2":
            return _gpt2(config.block_size, **config.model)
    raise ValueError(f"unknown model family {config.family!r} in the config of {config.task!r}")


def _isinstance(model, module, name):
    """isinstance(model, module.name), without importing ``module`` (slow) if nobody has yet."""
    mod = sys.modules.get(module)
    return mod is not None and isinstance(model, getattr(mod, name))


def model_family(model):
    """ "mlp" | "vit" | "gpt2" | "circuit" (or a model's own ``glmc_family``); TypeError otherwise.

    Introduced in chapter 0.
    """
    family = getattr(model, "glmc_family", None)
    if family is not None:
        return family
    if _isinstance(model, "transformers", "GPT2LMHeadModel"):
        return "gpt2"
    if _isinstance(model, "timm.models.vision_transformer", "VisionTransformer"):
        return "vit"
    if isinstance(model, nn.Sequential):
        from .spaces import mlp_layers
        mlp_layers(model)  # raises UnsupportedModelError (a TypeError) naming what is not supported
        return "mlp"
    if getattr(model, "glmc_kind", None) in KINDS:
        return "circuit"
    raise TypeError(f"{type(model).__name__} is not a supported model: expected an nn.Sequential MLP "
                    f"(Linear layers, element-wise activations), a timm VisionTransformer or a GPT2LMHeadModel")


def model_kind(model):
    """ "language" for causal language models, "classification" for classifiers."""
    kind = getattr(model, "glmc_kind", None)
    if kind in KINDS:
        return kind
    return "language" if model_family(model) == "gpt2" else "classification"


def batch_loss(model, batch, kind):
    """Summed cross-entropy (nats), number of predictions and of correct ones (None for language).

    Inputs: batch = (x [B, ...], y [B]) for classifiers; x [B, T] or (x, _) for language models,
    where logits[:, :-1] predict x[:, 1:]. Moves the batch to the model's device and float dtype.
    The batch is checked first (``checks.check_batch``: labels present and in range, token ids
    below the vocabulary, sequences within the positions), so a bad one raises a ValueError
    naming the problem instead of an IndexError (or a device-side assert on a GPU).
    """
    from .checks import check_batch
    param = next(model.parameters())
    x, y = check_batch(model, batch, kind)
    x = x.to(param.device, dtype=param.dtype if x.is_floating_point() else None)
    logits = forward_logits(model, x).float()
    if kind == "language":
        logits, y = logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)  # (B*(T-1), V)
    elif y.numel() and (int(y.min()) < 0 or int(y.max()) >= logits.shape[-1]):
        raise ValueError(f"labels must lie in [0, {logits.shape[-1]}) (the model's classes), got labels from "
                         f"{int(y.min())} to {int(y.max())}")
    y = y.to(param.device)
    loss = nn.functional.cross_entropy(logits, y, reduction="sum")
    correct = (logits.argmax(-1) == y).sum() if kind == "classification" else None
    return loss, y.numel(), correct


def forward_logits(model, x):
    """Logits of any supported model: ``[B, C]`` for classifiers, ``[B, T, V]`` for language models.

    Inputs: x [B, C, H, W] (images) or [B, T] (token ids), on any device: it is moved to the
    model's device (and floating dtype) first. GPT-2: ``model(input_ids=x).logits``.
    Introduced in chapter 0.
    """
    from .device import to_model_device
    x = to_model_device(x, model)
    hf = _isinstance(model, "transformers", "PreTrainedModel")
    out = model(input_ids=x) if hf else model(x)
    return out.logits if hasattr(out, "logits") else out
