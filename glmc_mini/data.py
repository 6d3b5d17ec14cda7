"""Tasks' data: the embedded offline sets (digits, pydoc text) and the paper profile's online sets.

Classification items are ``(x, y)`` with ``x`` a float image ``[C, H, W]``; language items are one
LongTensor window ``x`` of shape ``[T]`` of byte ids (vocabulary 256); a model predicts
``x[:, 1:]`` from ``x[:, :-1]``. Splits are fixed (seeded or positional), never reshuffled.
"""
import functools
import os
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


class ImageSet(Dataset):
    """Images stored compactly (e.g. uint8), normalised per channel on access.

    Inputs: images [N, C, H, W] (any dtype), labels [N] (int), mean/std [C] of the scaled images.
    Item i: ((images[i] / scale - mean) / std as float32 [C, H, W], label as a 0-d LongTensor).
    """

    def __init__(self, images, labels, mean, std, scale=1.0):
        self.images, self.labels, self.scale = images, labels.long(), scale
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i].float() / self.scale
        return (x - self.mean) / self.std, self.labels[i]


class TokenWindows(Dataset):
    """Windows of ``block_size`` tokens starting every ``stride`` tokens of a byte sequence.

    Inputs: tokens [N] (uint8). Item i: tokens[i*stride : i*stride + block_size] as a LongTensor [T].
    """

    def __init__(self, tokens, block_size, stride):
        self.tokens, self.block_size = tokens, block_size
        self.starts = torch.arange(0, len(tokens) - block_size + 1, stride)

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        s = int(self.starts[i])
        return self.tokens[s:s + self.block_size].long()


@dataclass
class TaskData:
    """Train and test splits of one task plus what a model needs to know about them."""
    name: str                    # dataset name, e.g. "digits"
    train: Dataset               # training split
    test: Dataset                # test split (never used for training)
    kind: str                    # "classification" | "language"
    num_classes: int = None      # classifiers: number of classes
    vocab_size: int = None       # language: vocabulary size (256 for bytes)
    input_shape: tuple = None    # classifiers: (C, H, W)
    block_size: int = None       # language: tokens per window

    def loader(self, split, batch_size, shuffle=False, seed=0, limit=None, drop_last=False):
        """A DataLoader over ``split`` ("train" | "test"); the same seed gives the same batches.

        ``limit``: use only the first ``limit`` examples of the split.
        Batches: ``(x [B, C, H, W], y [B])`` for classifiers, ``x [B, T]`` for language.
        Introduced in chapter 0.
        """
        dataset = {"train": self.train, "test": self.test}[split]
        if limit is not None and limit < len(dataset):
            dataset = Subset(dataset, range(limit))
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                          drop_last=drop_last)


def data_dir():
    """Where online data sets go: ``$GLMC_DATA``, else ``<$GLMC_CACHE or ~/.cache/glmc_mini>/data``."""
    if os.environ.get("GLMC_DATA"):
        return Path(os.environ["GLMC_DATA"]).expanduser()
    return Path(os.environ.get("GLMC_CACHE", "~/.cache/glmc_mini")).expanduser() / "data"


@functools.lru_cache(maxsize=None)
def digits():
    """scikit-learn's bundled 8x8 handwritten digits: 1,437 train / 360 test, stratified, seed 0.

    Pixels (0..16) are scaled to [0, 1], then normalised with the train split's mean and std.
    Items: (x [1, 8, 8] float32, y in 0..9). Introduced in chapter 0.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    X, y = load_digits(return_X_y=True)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=360, stratify=y, random_state=0)
    images = torch.tensor(X, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0  # (N, 1, 8, 8)
    labels = torch.tensor(y)
    mean, std = images[idx_train].mean().item(), images[idx_train].std().item()
    split = lambda idx: ImageSet(images[idx], labels[idx], [mean], [std])
    return TaskData("digits", split(idx_train), split(idx_test), "classification",
                    num_classes=10, input_shape=(1, 8, 8))


def _language(name, data, block_size):
    """Byte-level TaskData: first 90% train (windows at stride block_size // 2), last 10% test
    (non-overlapping windows)."""
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    n_train = int(0.9 * len(tokens))
    train = TokenWindows(tokens[:n_train], block_size, max(1, block_size // 2))
    test = TokenWindows(tokens[n_train:], block_size, block_size)
    return TaskData(name, train, test, "language", vocab_size=256, block_size=block_size)


@functools.lru_cache(maxsize=None)
def pydoc_text(block_size):
    """The English documentation shipped inside CPython (``pydoc_data.topics``), byte-level.

    Text: the topics' values joined in sorted key order, utf-8 encoded (~466 KB, vocabulary 256).
    Split: first 90% train, last 10% test. Items: LongTensor [block_size].
    Introduced in chapter 0.
    """
    from pydoc_data.topics import topics
    text = "".join(topics[k] for k in sorted(topics))
    return _language("pydoc", text.encode("utf-8"), block_size)


def _fetch(url, target):
    """Download ``url`` to ``target`` (temp file, then rename); a clear error if that fails."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
    os.close(fd)
    try:
        urllib.request.urlretrieve(url, tmp)
        os.replace(tmp, target)
    except Exception as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise RuntimeError(f"could not download {url} into {target.parent}: {err}. Download it by hand "
                           f"and place it there, or pass download=False once it is present.") from err


def _read_cifar_bin(path):
    """One CIFAR-10 binary batch: records of 1 label byte + 3072 pixel bytes (R, G, B planes, 32x32)."""
    raw = np.fromfile(path, dtype=np.uint8).reshape(-1, 3073)
    return torch.from_numpy(raw[:, 1:].reshape(-1, 3, 32, 32).copy()), torch.from_numpy(raw[:, 0].astype(np.int64))


def cifar10(root=None, download=True):
    """CIFAR-10 from its *binary* version (``cifar-10-binary.tar.gz``), parsed with NumPy.

    Files: ``<root>/cifar-10-batches-bin/data_batch_{1..5}.bin`` and ``test_batch.bin``;
    downloaded from CIFAR10_URL when missing and ``download``. Pixels scaled to [0, 1] and
    normalised per channel with the train split's mean and std. Items: (x [3, 32, 32], y in 0..9).
    """
    root = Path(root) if root is not None else data_dir()
    folder = root / "cifar-10-batches-bin"
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    if not all((folder / n).exists() for n in names):
        if not download:
            raise FileNotFoundError(f"CIFAR-10 binary files missing in {folder}; download {CIFAR10_URL} "
                                    f"and extract it into {root}, or pass download=True")
        archive = root / "cifar-10-binary.tar.gz"
        _fetch(CIFAR10_URL, archive)
        with tarfile.open(archive) as tar:
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(root, **safe)
    parts = [_read_cifar_bin(folder / n) for n in names[:5]]
    x_train, y_train = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    x_test, y_test = _read_cifar_bin(folder / names[5])
    scaled = x_train.float() / 255.0  # (N, 3, 32, 32)
    mean, std = scaled.mean(dim=(0, 2, 3)), scaled.std(dim=(0, 2, 3))
    split = lambda x, y: ImageSet(x, y, mean, std, scale=255.0)
    return TaskData("cifar10", split(x_train, y_train), split(x_test, y_test), "classification",
                    num_classes=10, input_shape=(3, 32, 32))


def tiny_shakespeare(root=None, block_size=64, download=True):
    """Tiny Shakespeare (``<root>/tinyshakespeare/input.txt``, ~1.1 MB), byte-level, 90/10 split.

    Downloaded from SHAKESPEARE_URL when missing and ``download``. Items: LongTensor [block_size].
    """
    root = Path(root) if root is not None else data_dir()
    path = root / "tinyshakespeare" / "input.txt"
    if not path.exists():
        if not download:
            raise FileNotFoundError(f"{path} is missing; download {SHAKESPEARE_URL} into "
                                    f"{path.parent}, or pass download=True")
        _fetch(SHAKESPEARE_URL, path)
    return _language("shakespeare", path.read_bytes(), block_size)


def load_task(task, profile=None):
    """The TaskData of a task name (see ``gm.TASKS``) under ``profile`` (its block size), or of a TaskConfig.

    Introduced in chapter 0.
    """
    from .profiles import task_config
    config = task_config(task, profile) if isinstance(task, str) else task
    loaders = {
        "digits": lambda: digits(),
        "pydoc": lambda: pydoc_text(config.block_size),
        "cifar10": lambda: cifar10(),
        "shakespeare": lambda: tiny_shakespeare(block_size=config.block_size),
    }
    return loaders[config.dataset]()
