"""Stock endpoint models: an ``nn.Sequential`` MLP, timm's ``VisionTransformer``, Hugging Face's
``GPT2LMHeadModel`` (each built by its family, ``glmc_mini.families``); plus the questions every
other module asks of a model: which family and kind it is, how to get its logits and its loss."""
import torch
from torch import nn

from .families import KINDS, _isinstance, by_name, detect  # noqa: F401  (KINDS, _isinstance: re-exported)


def build_model(task_or_config, seed=0):
    """A freshly initialised stock model for a task name or a ``TaskConfig``; init seeded by ``seed``.

    The global RNG state of the caller is left as it was. Introduced in chapter 0.
    """
    from .profiles import task_config
    config = task_config(task_or_config) if isinstance(task_or_config, str) else task_or_config
    try:
        family = by_name(config.family)
    except ValueError as e:
        raise ValueError(f"{e} (in the config of {config.task!r})") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return family.build(config)


def model_family(model):
    """The name of ``model``'s family (``families.detect``): "mlp" | "vit" | "gpt2" | "circuit" | ...;
    UnsupportedModelError (a TypeError) naming what is not supported otherwise.

    Introduced in chapter 0.
    """
    return detect(model).name


def model_kind(model):
    """ "language" for causal language models, "classification" for classifiers (a model's own
    ``glmc_kind`` first, else its family's kind)."""
    kind = getattr(model, "glmc_kind", None)
    if kind in KINDS:
        return kind
    return detect(model).kind


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
