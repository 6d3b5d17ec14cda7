"""Validation up front: arguments, models, pairs and data are checked before any solver runs, and
every refusal names its cause. Silently wrong is the worst outcome, so what is not known to be
exact is refused.

- :func:`check_model`: an ``nn.Module`` whose parameters and buffers hold values (not on the meta
  device), all on one device, of one floating dtype, and finite;
- :func:`check_pair`: two models of one architecture: same class, same configuration (Hugging Face
  config minus the fields that do not change the function), the same modules with the same
  attributes (timm's ``global_pool``, LayerNorm ``eps``, activation type, ...), the same parameter
  names, shapes and tying, dtype and device;
- :func:`check_batch`: one batch fits the model (labels present, token ids below the vocabulary,
  sequences no longer than the positions);
- argument helpers (:func:`positive_int`, :func:`real`, ...) and :func:`split_held_out`, which
  takes any iterable of batches (a single-pass generator too) for learned matching.
Introduced in chapter 1.
"""
import itertools
import math
import numbers

import torch
import torch.nn as nn

# Hugging Face config fields that do not change the function of the model in eval mode
_CONFIG_IGNORED = {
    "transformers_version", "architectures", "dtype", "torch_dtype", "use_cache", "return_dict",
    "output_hidden_states", "output_attentions", "id2label", "label2id", "problem_type", "tokenizer_class",
    "prefix", "task_specific_params", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    "decoder_start_token_id", "initializer_range", "resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_type",
    "summary_use_proj", "summary_activation", "summary_proj_to_labels", "summary_first_dropout",
    "tie_word_embeddings", "chunk_size_feed_forward", "finetuning_task", "torchscript", "use_bfloat16",
    "tf_legacy_loss", "n_ctx", "name_or_path", "max_length", "min_length", "do_sample", "early_stopping",
    "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "reorder_and_upcast_attn",  # the last: float32 attention, same function
}
# module attributes that do not change the function in eval mode (dropout rates, kernels, caches)
_ATTR_IGNORED = {"training", "p", "inplace", "drop_prob", "scale_by_keep", "fused_attn", "grad_checkpointing",
                 "gradient_checkpointing", "feature_info", "weight_init_mode", "fix_init", "config",
                 "reorder_and_upcast_attn",
                 "name_or_path",  # where from_pretrained read the model: two checkpoints always differ there
                 "all_tied_weights_keys"}  # transformers' record of tying: compared by _tied_groups where it matters


# --------------------------------------------------------------------------- arguments

def _is_int(x):
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def positive_int(value, name, minimum=1, maximum=None):
    """``value`` as an int >= ``minimum`` (and <= ``maximum``); TypeError / ValueError naming ``name`` otherwise."""
    if torch.is_tensor(value) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if not _is_int(value):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be an integer <= {maximum}, got {value}")
    return int(value)


def optional_positive_int(value, name, minimum=1):
    return None if value is None else positive_int(value, name, minimum)


def real(value, name, low=None, high=None, open_low=False):
    """``value`` as a finite float (in [low, high] where given; > low if ``open_low``)."""
    if torch.is_tensor(value) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value < low or (open_low and value == low)):
        raise ValueError(f"{name} must be {'>' if open_low else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def seed_value(seed, name="seed"):
    """A seed: an int in [0, 2**63 - 1] (what torch, numpy and random all take), as a Python int."""
    return positive_int(seed, name, minimum=0, maximum=2 ** 63 - 1)


def choice(value, name, options):
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"unknown {name} {value!r}; choose one of {tuple(options)}")
    return value


# --------------------------------------------------------------------------- models

def _state_items(model):
    return list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))


def check_model(model, name="model"):
    """TypeError / ValueError naming the first reason ``model`` cannot be transformed or evaluated:
    not an nn.Module, no parameters, meta tensors, several devices or floating dtypes, non-finite values."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch nn.Module, got {type(model).__name__}")
    items = _state_items(model)
    if not any(True for _ in model.parameters()):
        raise ValueError(f"{name} ({type(model).__name__}) has no parameters")
    devices, dtypes = {}, {}
    for key, t in items:
        if t.is_meta:
            raise ValueError(f"{name}.{key} is on the meta device: it has no values (load the weights first, "
                             "e.g. model.to_empty(device=...) then load_state_dict)")
        devices.setdefault(t.device, key)
        if t.is_floating_point():
            dtypes.setdefault(t.dtype, key)
    if len(devices) > 1:
        where = ", ".join(f"{k} on {d}" for d, k in devices.items())
        raise ValueError(f"{name} has tensors on several devices ({where}): move it to one device first")
    if len(dtypes) > 1:
        which = ", ".join(f"{k} in {d}" for d, k in dtypes.items())
        raise ValueError(f"{name} mixes floating dtypes ({which}): convert it to one dtype first")
    for key, t in items:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} parameter {key} has non-finite values (nan or inf)")
    return model


def model_device(model):
    return next(model.parameters()).device


def model_dtype(model):
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def _simple(value):
    """The comparable form of a module attribute, or None for those not compared (tensors, modules, ...)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return ("v", value)
    if isinstance(value, (tuple, list)):
        items = [_simple(v) for v in value]
        return None if any(i is None for i in items) else ("seq", tuple(items))
    if isinstance(value, dict):
        items = {k: _simple(v) for k, v in value.items()}
        return None if any(i is None for i in items.values()) else ("dict", tuple(sorted(items.items(), key=str)))
    if hasattr(value, "value") and type(value).__module__ != "builtins" and isinstance(value.value, (int, str)):
        return ("enum", str(value))  # enums, e.g. timm's output format
    return None


def _attributes(module):
    out = {}
    for key, value in vars(module).items():
        if key.startswith("_") or key in _ATTR_IGNORED:
            continue
        simple = _simple(value)
        if simple is not None:
            out[key] = simple
    return out


def _short(value):
    if torch.is_tensor(value):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, nn.Module):
        return f"a {type(value).__name__}"
    return value


def _first_attribute_difference(module_a, module_b):
    ta, tb = _attributes(module_a), _attributes(module_b)
    for key in list(ta) + [k for k in tb if k not in ta]:
        if ta.get(key) != tb.get(key):
            return key, _short(getattr(module_a, key, "(absent)")), _short(getattr(module_b, key, "(absent)"))
    return None


def _normalised(model, config):
    """``config`` with the implicit fields of ``model``'s family written out (``Family.config_defaults``);
    as is for a model no family claims (``check_architecture`` compares any two models)."""
    from .families import detect
    from .spaces import UnsupportedModelError
    try:
        family = detect(model)
    except UnsupportedModelError:
        return config
    return family.config_defaults(config)


def _config_difference(model_a, model_b):
    """(key, a, b) of the first differing Hugging Face config field that changes the function, else None."""
    ca, cb = getattr(model_a, "config", None), getattr(model_b, "config", None)
    if not (hasattr(ca, "to_dict") and hasattr(cb, "to_dict")):
        return None
    da, db = _normalised(model_a, ca.to_dict()), _normalised(model_b, cb.to_dict())
    for key in list(da) + [k for k in db if k not in da]:
        if key.startswith("_") or key in _CONFIG_IGNORED:
            continue
        if da.get(key, "(absent)") != db.get(key, "(absent)"):
            return key, da.get(key, "(absent)"), db.get(key, "(absent)")
    return None


def _tied_groups(model):
    """Names of parameters that share storage (e.g. GPT-2's tied embeddings), as a set of tuples."""
    groups = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {tuple(sorted(names)) for names in groups.values() if len(names) > 1}


def check_architecture(model_a, model_b, tying=True):
    """ValueError naming the first difference if ``model_a`` and ``model_b`` are not one architecture:
    class, configuration, module types and attributes, parameter / buffer names and shapes, tying."""
    if type(model_a) is not type(model_b):
        raise ValueError(f"model_a is a {type(model_a).__name__} and model_b a {type(model_b).__name__}: "
                         "not one architecture")
    diff = _config_difference(model_a, model_b)
    if diff:
        raise ValueError(f"model_a and model_b differ in config.{diff[0]}: {diff[1]!r} vs {diff[2]!r}; the merged "
                         "model would be built with model_a's, so its end at model_b would not be model_b")
    diff = _first_attribute_difference(model_a, model_b)  # the top module's settings (timm: global_pool, ...)
    if diff:
        raise ValueError(f"model_a and model_b differ at {type(model_a).__name__}.{diff[0]}: {diff[1]!r} vs "
                         f"{diff[2]!r}; the merged model would be built with model_a's settings")
    sa, sb = dict(_state_items(model_a)), dict(_state_items(model_b))
    for key in list(sa) + [k for k in sb if k not in sa]:
        if key not in sa or key not in sb:
            raise ValueError(f"parameter {key!r} is in only one of the two models "
                             f"({'model_a' if key in sa else 'model_b'}): different depth or modules")
        if sa[key].shape != sb[key].shape:
            raise ValueError(f"shape mismatch at {key}: {tuple(sa[key].shape)} vs {tuple(sb[key].shape)} "
                             "(incompatible shapes; for different widths use gm.embed_wider first)")
    _compare_modules(model_a, model_b)
    if tying and _tied_groups(model_a) != _tied_groups(model_b):
        raise ValueError(f"parameter tying differs: {_tied_groups(model_a)} vs {_tied_groups(model_b)}")
    persistent = set(model_a.state_dict())
    for key, t in model_a.named_buffers():
        if key not in persistent and not torch.equal(t, sb[key].to(t.device)):
            raise ValueError(f"buffer {key} differs between model_a and model_b (it is not interpolated)")


def _compare_modules(model_a, model_b):
    ma, mb = dict(model_a.named_modules()), dict(model_b.named_modules())
    for name in list(ma) + [n for n in mb if n not in ma]:
        where = name or type(model_a).__name__
        if name not in ma or name not in mb:
            raise ValueError(f"module {where} is in {'model_a' if name in ma else 'model_b'} only")
        if type(ma[name]) is not type(mb[name]):
            qual = lambda m: f"{type(m).__module__}.{type(m).__qualname__}"
            raise ValueError(f"module {where} is a {qual(ma[name])} in model_a and a {qual(mb[name])} in model_b")
        diff = _first_attribute_difference(ma[name], mb[name])
        if diff:
            raise ValueError(f"model_a and model_b differ at {where}.{diff[0]}: {diff[1]!r} vs {diff[2]!r}")


def check_pair(model_a, model_b, tying=True):
    """Both models valid (:func:`check_model`), one architecture (:func:`check_architecture`), one
    device and one dtype; ValueError / TypeError naming the first problem."""
    check_model(model_a, "model_a")
    check_model(model_b, "model_b")
    check_architecture(model_a, model_b, tying)
    da, db = model_device(model_a), model_device(model_b)
    if da != db:
        raise ValueError(f"model_a is on {da} and model_b on {db}: move both to one device first")
    ta, tb = model_dtype(model_a), model_dtype(model_b)
    if ta != tb:
        raise ValueError(f"model_a is {ta} and model_b {tb}: convert both to one dtype first "
                         f"(e.g. model_b.to({ta}))")


# --------------------------------------------------------------------------- data

def token_limits(model):
    """(vocabulary size, positions) of a language model, or (None, None)."""
    config = getattr(model, "config", None)
    if hasattr(config, "vocab_size") and hasattr(config, "n_positions"):
        return config.vocab_size, config.n_positions
    wte, wpe = getattr(model, "wte", None), getattr(model, "wpe", None)
    if torch.is_tensor(wte) and torch.is_tensor(wpe):
        return wte.shape[0], wpe.shape[0]
    return None, None


def split_batch(batch, kind):
    """(x, y) of one batch; ValueError / TypeError naming what is wrong with its form."""
    if isinstance(batch, dict):
        raise TypeError("a batch must be (x, y) for classifiers or token ids x [B, T] (or (x, _)) for language "
                        f"models, got a dict with keys {sorted(batch)}")
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("got an empty batch ()")
        x, y = batch[0], (batch[1] if len(batch) > 1 else None)
    else:
        x, y = batch, None
    if not torch.is_tensor(x):
        raise TypeError(f"the inputs x of a batch must be a tensor, got {type(x).__name__}")
    if kind == "classification":
        if y is None:
            raise ValueError("a classifier's batch must be (x, y): this one has no labels y")
        if not torch.is_tensor(y) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool \
                or y.dim() != 1 or y.shape[0] != x.shape[0]:
            shape = tuple(y.shape) if torch.is_tensor(y) else type(y).__name__
            raise ValueError(f"labels y must be integer class indices of shape [B] = [{x.shape[0]}], got {shape}"
                             + (f" {y.dtype}" if torch.is_tensor(y) else ""))
    return x, y


def _common_problem(x, y):
    for what, t in (("inputs x", x), ("labels y", y)):
        if torch.is_tensor(t) and t.is_meta:
            return f"the batch's {what} are on the meta device: they hold no values"
    if x.dim() == 0 or x.shape[0] == 0:
        return f"a batch with no examples (inputs of shape {tuple(x.shape)})"
    return None


def _input_problem(model, x):
    """Why classifier inputs ``x`` do not fit ``model`` (dtype, finiteness, shape), or None."""
    if not x.is_floating_point():
        return f"a classifier's inputs x must be floating point, got {x.dtype}"
    if not bool(torch.isfinite(x).all()):
        return "the batch's inputs x have non-finite values (nan or inf)"
    embed = getattr(model, "patch_embed", None)
    proj = getattr(embed, "proj", None)
    if isinstance(proj, nn.Conv2d):  # timm VisionTransformer
        if x.dim() != 4 or x.shape[1] != proj.in_channels:
            return f"images must be [B, {proj.in_channels}, H, W], got {tuple(x.shape)}"
        size = getattr(embed, "img_size", None)
        strict = getattr(embed, "strict_img_size", False) and not getattr(embed, "dynamic_img_pad", False)
        if strict and not getattr(model, "dynamic_img_size", False) and size and tuple(x.shape[2:]) != tuple(size):
            return f"images must be {tuple(size)} pixels for this model, got {tuple(x.shape[2:])}"
    if isinstance(model, nn.Sequential):
        linears = [m for m in model if isinstance(m, nn.Linear)]
        flat = type(model[0]) is nn.Flatten
        n = int(x[0].numel()) if flat and model[0].start_dim == 1 and model[0].end_dim == -1 else x.shape[-1]
        if linears and n != linears[0].in_features:
            return (f"inputs of shape {tuple(x.shape)} give {n} features; the MLP's first Linear takes "
                    f"{linears[0].in_features}")
    return None


def check_batch(model, batch, kind):
    """(x, y) of ``batch`` after checking it fits ``model``: form, dtypes, shapes, finite inputs,
    token ids, sequence length. Integer labels and token ids come back as int64."""
    x, y = split_batch(batch, kind)
    problem = _common_problem(x, y)
    if problem:
        raise ValueError(problem)
    if kind != "language":
        problem = _input_problem(model, x)
        if problem:
            raise ValueError(problem)
        return x, (y.long() if torch.is_tensor(y) else y)
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool or x.dim() != 2:
        raise ValueError(f"a language model's batch must be token ids of shape [B, T] (integers), got "
                         f"{tuple(x.shape)} {x.dtype}")
    if x.shape[1] < 2:
        raise ValueError(f"sequences of length {x.shape[1]}: the loss needs at least 2 tokens (logits[:, :-1] "
                         "predict x[:, 1:])")
    vocab, positions = token_limits(model)
    if positions is not None and x.shape[1] > positions:
        raise ValueError(f"sequences of length {x.shape[1]} are longer than the model's n_positions = {positions}")
    if x.numel() and (int(x.min()) < 0 or (vocab is not None and int(x.max()) >= vocab)):
        raise ValueError(f"token ids must lie in [0, vocab_size = {vocab}), got ids from {int(x.min())} to "
                         f"{int(x.max())}")
    return x.long(), y


def check_data(data, name="data", required=False):
    """``data`` is an iterable of batches (not a tensor or a single batch); None only if not ``required``."""
    if data is None:
        if required:
            raise TypeError(f"{name} is None: give an iterable of batches, e.g. a DataLoader or a list of (x, y)")
        return None
    if torch.is_tensor(data) or isinstance(data, (str, bytes, dict)):
        raise TypeError(f"{name} must be an iterable of batches (e.g. a DataLoader or a list of (x, y)), got a "
                        f"{type(data).__name__}; wrap a single batch in a list: [batch]")
    try:
        iter(data)
    except TypeError:
        raise TypeError(f"{name} must be an iterable of batches, got {type(data).__name__}") from None
    return data


def first_batch(data, name="data"):
    """(the first batch, an iterable that still yields every batch of ``data``): works for lists,
    DataLoaders and single-pass iterators alike."""
    it = iter(data)
    try:
        first = next(it)
    except StopIteration:
        raise ValueError(f"{name} is empty: it yielded no batch") from None
    if it is data:  # a single-pass iterator: give the peeked batch back
        return first, itertools.chain([first], it)
    return first, data


def split_held_out(data, held, name="data"):
    """(held-out batches, a training stream that never yields them) from one pass over ``data``.

    The first ``held`` batches are kept aside (fewer when the pass is short: half of it, at least
    one); the training stream yields the remaining batches of the same pass and then replays them,
    so ``data`` is iterated once (a single-pass generator works) and no held-out example is ever
    trained on, even when a shuffling DataLoader would reorder a second pass. The batches seen are
    kept in memory (at most one pass). ValueError if the pass has fewer than two batches."""
    it = iter(data)
    head = list(itertools.islice(it, held + 1))
    if len(head) < 2:
        raise ValueError(f"{name} must yield at least two batches: one to train on and one, held out, to choose "
                         f"the returned iterate on; got {len(head)}")
    k = min(held, len(head) // 2) if len(head) <= held else held
    return head[:k], _replay(head[k:], it)


def _replay(seen, rest):
    """Yield ``seen``, then the rest of the pass (remembered), then everything again, forever."""
    seen = list(seen)
    yield from seen
    for batch in rest:
        seen.append(batch)
        yield batch
    while True:
        yield from seen
