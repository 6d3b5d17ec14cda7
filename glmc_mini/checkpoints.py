"""One's own checkpoints on disk: read two model directories, align them, write the results.

    python -m glmc_mini align DIR_A DIR_B --method weight --out OUT [--t 0.5]

A directory is either a Hugging Face model directory (``config.json`` with a ``model_type``,
weights in safetensors or ``pytorch_model.bin``; read with ``AutoModelForCausalLM``, local files
only, no remote code) or a timm checkpoint (``config.json`` with an ``architecture`` and
optionally ``model_args`` / ``num_classes``, as timm's ``save_for_hf`` writes it, beside
``model.safetensors`` or ``pytorch_model.bin``; built with ``timm.create_model(architecture,
pretrained=False, **args)``). A ``.bin`` file is read only with ``torch.load(weights_only=True)``,
which refuses anything but tensors: nothing else from it is unpickled.

``OUT`` receives ``model_a`` (A in canonical form: the same function as A), ``model_b`` (B moved
onto that canonical A: the same function as B), with ``--t T`` also ``merged`` ((1 - T) A + T B of
those two), each a directory of the input's format (safetensors weights, the input's config, A's
tokenizer files when it has some), and ``summary.json``. The input directories are never written.
The models are aligned in float32 on ``device`` and written in the dtype of A's stored weights.
"""
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
                   "chat_template.jinja", "chat_template.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
OUTPUTS = {"model_a": "A in canonical form (same function as A)",
           "model_b": "B aligned onto canonical A (same function as B)",
           "merged": "(1 - t) model_a + t model_b"}


class CheckpointError(ValueError):
    """A checkpoint directory (or a file given with it) that cannot be read or aligned; the message names why."""


@dataclass
class Checkpoint:
    """A model read from a directory, and what it takes to write models like it."""
    model: torch.nn.Module
    path: Path
    format: str                      # "hf" (Hugging Face) | "timm"
    config: dict                     # config.json as read
    dtype: torch.dtype               # dtype of the stored weights: outputs are written in it
    tokenizer_files: list = field(default_factory=list)


def one_line(error):
    """An exception's message on one line (loaders' messages often span several)."""
    return " ".join(str(error).split()) or type(error).__name__


def _transformers_major():
    import transformers
    return int(transformers.__version__.split(".")[0])


def load_checkpoint(path, device="cpu"):
    """Read a Hugging Face or timm model directory (module docstring) into a :class:`Checkpoint`.

    The model is in eval mode, in float32, on ``device``. CheckpointError naming the cause for a
    missing directory or config, a config of neither format, missing or unreadable weights, weights
    that do not fit the configured model, and a model family glmc_mini does not support.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory (give a Hugging Face model directory or a timm checkpoint "
                              "directory with its config.json)")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no config.json (a Hugging Face model directory or a timm checkpoint needs one)")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({one_line(e)})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_file}: expected a JSON object, got {type(config).__name__}")
    if "architecture" in config:
        model, dtype, fmt = *_load_timm(path, config), "timm"
    elif "model_type" in config:
        model, dtype, fmt = *_load_hf(path), "hf"
    else:
        raise CheckpointError(f"{cfg_file}: neither a Hugging Face config (no 'model_type') nor a timm config "
                              "(no 'architecture')")
    import glmc_mini as gm
    try:
        gm.model_family(model)
    except TypeError as e:
        raise CheckpointError(f"{path}: {one_line(e)}") from None
    model = model.float().to(device).eval()
    tokenizer = [f for f in TOKENIZER_FILES if (path / f).is_file()]
    return Checkpoint(model, path, fmt, config, dtype, tokenizer)


def _load_hf(path):
    """(AutoModelForCausalLM from ``path``, stored dtype); refuses missing or misfitting weights."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    dtype_arg = {"dtype" if _transformers_major() >= 5 else "torch_dtype": "auto"}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the loading report is checked below instead
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, trust_remote_code=False, weights_only=True, output_loading_info=True,
            **dtype_arg)
    except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError, RuntimeError...
        raise CheckpointError(f"{path}: AutoModelForCausalLM cannot load it ({one_line(e)})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    bad = {k: list(v) for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    if bad:
        kind, keys = next(iter(bad.items()))
        raise CheckpointError(f"{path}: the weights do not fit the config ({kind.replace('_', ' ')}: "
                              f"{', '.join(map(str, keys[:3]))}{' ...' if len(keys) > 3 else ''})")
    # from_pretrained records the directory on the model; gm.align's pair check compares the top
    # module's attributes and would call two directories two architectures
    for module in model.modules():
        if isinstance(getattr(module, "name_or_path", None), str):
            module.name_or_path = ""
    return model, next(model.parameters()).dtype


def _read_weights(path):
    """The state dict of ``path``'s model.safetensors, else of its pytorch_model.bin read with
    ``torch.load(weights_only=True)`` (tensors only, nothing else is unpickled)."""
    st, binary = path / WEIGHT_FILES[0], path / WEIGHT_FILES[1]
    if st.is_file():
        from safetensors.torch import load_file
        try:
            return load_file(st)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError
            raise CheckpointError(f"{st}: not a readable safetensors file ({one_line(e)})") from None
    if binary.is_file():
        try:
            state = torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - UnpicklingError for anything but tensors, RuntimeError, EOFError
            raise CheckpointError(f"{binary}: refused: torch.load(weights_only=True) cannot read it as plain tensors "
                                  f"({type(e).__name__}); glmc_mini unpickles nothing else: convert it to "
                                  "model.safetensors") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise CheckpointError(f"{binary}: expected a state dict of tensors")
        return state
    raise CheckpointError(f"{path}: no weights (expected {' or '.join(WEIGHT_FILES)})")


def _timm_args(config):
    """``create_model`` keyword arguments from a timm config.json: its ``model_args`` plus ``num_classes``."""
    args = dict(config.get("model_args") or {})
    pretrained = config.get("pretrained_cfg") if isinstance(config.get("pretrained_cfg"), dict) else {}
    num_classes = config.get("num_classes", pretrained.get("num_classes"))
    if num_classes is not None:
        args.setdefault("num_classes", num_classes)
    return args


def _load_timm(path, config):
    """(timm model built from ``config`` with ``path``'s weights, stored dtype)."""
    import timm
    arch = config["architecture"]
    if not isinstance(arch, str) or not timm.is_model(arch):
        raise CheckpointError(f"{path}: timm {timm.__version__} has no architecture {arch!r}")
    state = _read_weights(path)
    try:
        model = timm.create_model(arch, pretrained=False, **_timm_args(config))
    except Exception as e:  # noqa: BLE001 - unknown or bad model arguments
        raise CheckpointError(f"{path}: timm.create_model({arch!r}, **model_args) failed ({one_line(e)})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the weights do not fit {arch} built from config.json "
                              f"({one_line(e)[:300]})") from None
    floats = [v.dtype for v in state.values() if v.is_floating_point()]
    return model, floats[0] if floats else torch.float32


def _plain_state(model, dtype):
    """CPU state dict for safetensors: floats cast to ``dtype``, contiguous, no two keys sharing memory."""
    out, seen = {}, set()
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu", dtype=dtype if v.is_floating_point() else None).contiguous()
        if v.data_ptr() in seen or v.data_ptr() == 0:
            v = v.clone()
        seen.add(v.data_ptr())
        out[k] = v
    return out


def save_checkpoint(model, out, like):
    """Write ``model`` to the new directory ``out`` in the format of the Checkpoint ``like``.

    Hugging Face: ``save_pretrained`` (safetensors) plus ``like``'s tokenizer files; timm:
    ``like``'s config.json and model.safetensors (loadable with :func:`load_checkpoint`, or with
    ``timm.create_model("local-dir:" + out, pretrained=True)``). Floating weights are written in
    ``like.dtype``. ``model`` itself is not modified.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=False)
    if like.format == "hf":
        import copy
        if next(model.parameters()).dtype != like.dtype:
            model = copy.deepcopy(model).to(like.dtype)
        kwargs = {} if _transformers_major() >= 5 else {"safe_serialization": True}
        model.save_pretrained(out, **kwargs)
        for name in like.tokenizer_files:
            shutil.copyfile(like.path / name, out / name)
    else:
        from safetensors.torch import save_file
        (out / "config.json").write_text(json.dumps(like.config, indent=2) + "\n", encoding="utf-8")
        save_file(_plain_state(model, like.dtype), out / WEIGHT_FILES[0], metadata={"format": "pt"})
    return out


def _positions(model):
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return None


def read_data(path, ckpt, batch_size=8, seq_len=None, seed=0):
    """Batches for activation or learned matching from the file ``path``, for ``ckpt``'s model.

    Language models: a text file, tokenized with the directory's tokenizer when it has one, else
    read as bytes (the book's byte-level models: ids 0-255); cut into sequences of ``seq_len``
    tokens (default min(128, the model's positions)). Classifiers: a ``.safetensors`` or ``.npz``
    file with ``x`` [N, C, H, W] (float) and ``y`` [N] (int labels). The sequences / examples are
    shuffled with ``seed`` (the same batches on every process) and grouped into ``batch_size``.
    Returns a list of CPU batches: token ids [B, T], or (x, y).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--data {path}: no such file")
    gen = torch.Generator().manual_seed(seed)
    if ckpt.format == "hf":  # AutoModelForCausalLM: a language model
        tokens = _tokens(path, ckpt)
        positions = _positions(ckpt.model)
        seq_len = seq_len or min(128, positions or 128)
        if positions is not None and seq_len > positions:
            raise CheckpointError(f"--seq-len {seq_len} is longer than the model's {positions} positions")
        n = tokens.numel() // seq_len
        if n == 0:
            raise CheckpointError(f"--data {path}: {tokens.numel()} tokens, fewer than one sequence of {seq_len}")
        seqs = tokens[: n * seq_len].view(n, seq_len)[torch.randperm(n, generator=gen)]
        return list(seqs.split(batch_size))
    x, y = _arrays(path)
    order = torch.randperm(x.shape[0], generator=gen)
    x, y = x[order], y[order]
    return list(zip(x.split(batch_size), y.split(batch_size)))


def _tokens(path, ckpt):
    """Token ids [N] of a text file: the checkpoint's tokenizer, else bytes."""
    if ckpt.tokenizer_files:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(f"--data {path}: not UTF-8 text ({one_line(e)})") from None
        try:
            tok = AutoTokenizer.from_pretrained(ckpt.path, local_files_only=True, trust_remote_code=False)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{ckpt.path}: its tokenizer cannot be loaded ({one_line(e)})") from None
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "sequence longer than the model's maximum": it is cut below
        try:
            ids = tok(text, add_special_tokens=False)["input_ids"]
        finally:
            hf_logging.set_verbosity(verbosity)
        tokens, source = torch.tensor(ids, dtype=torch.long), f"{ckpt.path}'s tokenizer"
    else:
        tokens = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8).long()
        source = "bytes (no tokenizer)"
    vocab = getattr(getattr(ckpt.model, "config", None), "vocab_size", None)
    if vocab is not None and tokens.numel() and int(tokens.max()) >= vocab:
        raise CheckpointError(f"--data {path}: read as {source}, it has token id {int(tokens.max())} but the model's "
                              f"vocabulary has {vocab} tokens")
    return tokens


def _arrays(path):
    """(x float [N, ...], y long [N]) from a .safetensors or .npz file."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            arrays = load_file(path)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"--data {path}: not a readable safetensors file ({one_line(e)})") from None
    elif path.suffix == ".npz":
        import numpy as np
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: torch.from_numpy(f[k]) for k in f.files}
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"--data {path}: not a readable .npz file of plain arrays ({one_line(e)})") from None
    else:
        raise CheckpointError(f"--data {path}: a classifier needs a .safetensors or .npz file with x [N, C, H, W] and "
                              "y [N]")
    if "x" not in arrays or "y" not in arrays:
        raise CheckpointError(f"--data {path}: needs arrays 'x' and 'y', has {sorted(arrays)}")
    x, y = arrays["x"], arrays["y"]
    if not x.is_floating_point() or y.is_floating_point() or y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise CheckpointError(f"--data {path}: expected x float [N, ...] and y int [N], got x {x.dtype} "
                              f"{tuple(x.shape)}, y {y.dtype} {tuple(y.shape)}")
    return x.float(), y.long()


def _check_out(out, inputs):
    """``out`` is a new or empty directory outside the input directories."""
    out = Path(out).resolve()
    for p in inputs:
        p = Path(p).resolve()
        if out == p or p in out.parents:
            raise CheckpointError(f"--out {out} lies inside the input directory {p}, which is never written")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"--out {out} exists and is not an empty directory")
    return out


def _outputs(method, t):
    """{output directory: what it holds} for ``method`` (``none`` writes A and B unchanged) and ``t``."""
    outputs = dict(OUTPUTS) if method != "none" else {"model_a": "A unchanged (method none)",
                                                       "model_b": "B unchanged (method none)",
                                                       "merged": OUTPUTS["merged"]}
    if t is None:
        del outputs["merged"]
    return outputs


class _hf_progress:
    """``with _hf_progress(False):`` transformers' loading / writing progress bars off inside."""

    def __init__(self, show):
        self.show = show

    def __enter__(self):
        from transformers.utils import logging as hf_logging
        self.was = hf_logging.is_progress_bar_enabled()
        if not self.show:
            hf_logging.disable_progress_bar()

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging
        if self.was:
            hf_logging.enable_progress_bar()


def _distance(model_a, model_b=None):
    """Euclidean distance between the floating parameters (and buffers) of two models of one class;
    with ``model_b`` None, the norm of ``model_a``'s."""
    b = model_b.state_dict() if model_b is not None else {}
    total = sum(float((v.float() - (b[k].float() if k in b else 0.0)).pow(2).sum())
                for k, v in model_a.state_dict().items() if v.is_floating_point() and (model_b is None or k in b))
    return math.sqrt(total)


def align_checkpoints(dir_a, dir_b, out, method="weight", symmetries=("perm", "orth", "inv"), data=None,
                      t=None, steps=None, seed=0, batch_size=8, seq_len=None, device="cpu", progress=True,
                      schedule="constant"):
    """Align the checkpoint in ``dir_b`` onto the one in ``dir_a`` and write the results to ``out``.

    What ``python -m glmc_mini align`` runs (module docstring: formats and outputs). ``data``: a
    file (:func:`read_data`), needed by methods "activation" and "learned"; ``steps`` and ``schedule``,
    learned matching's (``gm.align``). Under an initialised
    torch.distributed process group every process reads and aligns (learned matching splits each
    batch across them, ``distributed``) and process 0 alone writes ``out``. Everything is checked
    before any solver runs; CheckpointError / ValueError / TypeError naming the cause otherwise.
    Returns the summary (also written to ``out/summary.json``).
    """
    import glmc_mini as gm
    from .distributed import barrier, world
    rank, size = world()
    start = time.perf_counter()
    if method in ("activation", "learned") and data is None:
        raise CheckpointError(f"--method {method} needs --data FILE (text for language models, .safetensors/.npz "
                              "for classifiers)")
    if t is not None and not (isinstance(t, (int, float)) and 0.0 <= t <= 1.0):
        raise CheckpointError(f"--t must lie in [0, 1], got {t}")
    out = _check_out(out, (dir_a, dir_b))
    barrier()  # every process has checked ``out`` before process 0 may write it
    with _hf_progress(progress):
        a, b = load_checkpoint(dir_a, device), load_checkpoint(dir_b, device)
    if a.format != b.format:
        names = {"hf": "a Hugging Face", "timm": "a timm"}
        raise CheckpointError(f"{a.path} is {names[a.format]} checkpoint and {b.path} {names[b.format]} one: "
                              "different families")
    batches = read_data(data, a, batch_size, seq_len, seed) if data is not None else None
    loaded = time.perf_counter()
    res = gm.align(a.model, b.model, method=method, symmetries=symmetries, data=batches, steps=steps, seed=seed,
                   schedule=schedule, progress=progress)
    merged = gm.interpolate(res.model_a, res.model_b, t) if t is not None else None
    summary = {
        "format": a.format, "model_a_in": str(a.path.resolve()), "model_b_in": str(b.path.resolve()),
        "method": method, "symmetries": list(res.symmetries), "seed": seed, "steps": steps,
        "schedule": schedule if method == "learned" else None, "t": t,
        "data": None if data is None else str(Path(data).resolve()),
        "batches": None if batches is None else len(batches), "processes": size,
        "canonical": method != "none",
        "distance_before": _distance(res.model_a, b.model if method == "none" else gm.canonicalize(b.model)),
        "distance_after": _distance(res.model_a, res.model_b),
        "norm_a": _distance(res.model_a),
        "learned_loss_first_last": [res.losses[0], res.losses[-1]] if res.losses else None,
        "seconds_load": loaded - start, "seconds_align": res.seconds, "seconds_total": None,
        "outputs": _outputs(method, t),
        "dtype": str(a.dtype).replace("torch.", ""),
    }
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        with _hf_progress(progress):
            save_checkpoint(res.model_a, out / "model_a", a)
            save_checkpoint(res.model_b, out / "model_b", a)
            if merged is not None:
                save_checkpoint(merged, out / "merged", a)
        summary["seconds_total"] = time.perf_counter() - start
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    barrier()
    return summary

