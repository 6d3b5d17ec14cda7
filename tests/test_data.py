"""Data: fixed, disjoint, documented splits; the online sets' loaders on tiny local stand-ins."""
import collections
import io
import tarfile
import urllib.request

import numpy as np
import pytest
import torch

import glmc_mini as gm
from glmc_mini import data as gd


def test_digits_split_sizes_and_stratification():
    d = gm.digits()
    assert (len(d.train), len(d.test)) == (1437, 360)
    assert d.kind == "classification" and d.num_classes == 10 and d.input_shape == (1, 8, 8)
    x, y = d.train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.long
    counts = collections.Counter(int(y) for _, y in d.test)
    assert set(counts) == set(range(10)) and min(counts.values()) >= 35  # stratified: 36 +- 1 per class


def _raw_rows(dataset):
    """Pixel rows (0..16 ints) recovered from a normalised digits split."""
    X = torch.stack([dataset[i][0] for i in range(len(dataset))]) * dataset.std + dataset.mean
    return [tuple(r) for r in (X.view(len(dataset), -1) * 16).round().int().tolist()]


def test_digits_split_is_fixed_disjoint_and_normalised():
    from sklearn.datasets import load_digits
    a, b = gm.digits(), gd.digits.__wrapped__()  # the cached and a freshly built copy
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    everything = collections.Counter(tuple(r) for r in load_digits().data.astype(int).tolist())
    assert collections.Counter(_raw_rows(a.train)) + collections.Counter(_raw_rows(a.test)) == everything
    X = torch.stack([a.train[i][0] for i in range(len(a.train))])
    assert abs(X.mean().item()) < 1e-4 and abs(X.std().item() - 1) < 1e-3


def test_pydoc_windows_and_split():
    T = 16
    d = gm.pydoc_text(T)
    from pydoc_data.topics import topics
    raw = "".join(topics[k] for k in sorted(topics)).encode("utf-8")
    n_train = int(0.9 * len(raw))
    assert d.kind == "language" and d.vocab_size == 256 and d.block_size == T
    assert len(d.train) == (n_train - T) // (T // 2) + 1
    assert len(d.test) == (len(raw) - n_train) // T
    assert bytes(d.train[0].tolist()) == raw[:T] and bytes(d.train[1].tolist()) == raw[T // 2:T // 2 + T]
    test_text = bytes(torch.cat([d.test[i] for i in range(len(d.test))]).tolist())
    assert test_text == raw[n_train:n_train + len(d.test) * T]  # the last 10%, non-overlapping
    last = d.train[len(d.train) - 1]
    assert last.dtype == torch.long and last.shape == (T,)
    assert int(d.train.starts[-1]) + T <= n_train  # no train window reaches into the test part


def test_loader_is_deterministic_and_limited():
    d = gm.digits()
    first = lambda seed: next(iter(d.loader("train", 32, shuffle=True, seed=seed)))[1]
    assert torch.equal(first(3), first(3)) and not torch.equal(first(3), first(4))
    batches = list(d.loader("test", 50, limit=120))
    assert [len(b[1]) for b in batches] == [50, 50, 20]
    x = next(iter(gm.pydoc_text(8).loader("train", 4)))
    assert x.shape == (4, 8) and x.dtype == torch.long


def _write_cifar(folder, n_train=3, n_test=2):
    """Tiny stand-in CIFAR-10 binary batches: label byte + 3072 pixel bytes per record."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for i, name in enumerate(names):
        n = n_test if name == "test_batch.bin" else n_train
        records = np.concatenate([np.full((n, 1), i, np.uint8), rng.integers(0, 256, (n, 3072), dtype=np.uint8)], 1)
        records.tofile(folder / name)
    return names


def test_cifar10_parses_binary_batches(tmp_path):
    _write_cifar(tmp_path / "cifar-10-batches-bin")
    d = gm.cifar10(tmp_path, download=False)
    assert (len(d.train), len(d.test)) == (15, 2) and d.input_shape == (3, 32, 32)
    assert [int(d.train[i][1]) for i in range(0, 15, 3)] == [0, 1, 2, 3, 4] and int(d.test[0][1]) == 5
    raw = np.fromfile(tmp_path / "cifar-10-batches-bin" / "data_batch_1.bin", np.uint8).reshape(-1, 3073)
    x0 = d.train[0][0] * d.train.std + d.train.mean
    assert torch.allclose(x0 * 255, torch.tensor(raw[0, 1:].reshape(3, 32, 32), dtype=torch.float32), atol=1e-3)
    X = torch.stack([d.train[i][0] for i in range(15)])
    assert torch.allclose(X.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)  # per-channel normalised


def test_cifar10_missing_files_error_names_url_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        gm.cifar10(tmp_path, download=False)
    assert gd.CIFAR10_URL in str(err.value) and str(tmp_path) in str(err.value)


def test_cifar10_download_extracts_archive(tmp_path, monkeypatch):
    staged = tmp_path / "staged"
    names = _write_cifar(staged / "cifar-10-batches-bin")
    archive = tmp_path / "archive.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in names:
            tar.add(staged / "cifar-10-batches-bin" / name, arcname=f"cifar-10-batches-bin/{name}")
    fetched = []
    monkeypatch.setattr(urllib.request, "urlretrieve",
                        lambda url, path: fetched.append(url) or open(path, "wb").write(archive.read_bytes()))
    d = gm.cifar10(tmp_path / "root", download=True)
    assert fetched == [gd.CIFAR10_URL] and len(d.train) == 15


def test_download_failure_is_clear(tmp_path, monkeypatch):
    def offline(url, path):
        raise OSError("network unreachable")
    monkeypatch.setattr(urllib.request, "urlretrieve", offline)
    with pytest.raises(RuntimeError, match="could not download") as err:
        gm.tiny_shakespeare(tmp_path, block_size=8, download=True)
    assert gd.SHAKESPEARE_URL in str(err.value) and str(tmp_path) in str(err.value)
    assert not list(tmp_path.rglob("*.part"))  # no half-written file left behind


def test_tiny_shakespeare_split(tmp_path, monkeypatch):
    text = ("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20).encode()
    monkeypatch.setattr(urllib.request, "urlretrieve", lambda url, path: open(path, "wb").write(text))
    d = gm.tiny_shakespeare(tmp_path, block_size=10, download=True)
    assert (tmp_path / "tinyshakespeare" / "input.txt").read_bytes() == text
    n_train = int(0.9 * len(text))
    assert len(d.train) == (n_train - 10) // 5 + 1 and len(d.test) == (len(text) - n_train) // 10
    assert bytes(d.test[0].tolist()) == text[n_train:n_train + 10]
    again = gm.tiny_shakespeare(tmp_path, block_size=10, download=False)  # now read from disk
    assert torch.equal(again.train[3], d.train[3])


def test_tiny_shakespeare_missing_without_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="input.txt"):
        gm.tiny_shakespeare(tmp_path, block_size=8, download=False)


def test_load_task_and_profiles(monkeypatch):
    assert gm.load_task("vit-digits") is gm.digits()
    assert gm.load_task("gpt-pydoc", "quick").block_size == gm.task_config("gpt-pydoc", "quick").block_size
    monkeypatch.setenv("GLMC_PROFILE", "fast")
    with pytest.raises(ValueError, match="GLMC_PROFILE"):
        gm.get_profile()
    monkeypatch.setenv("GLMC_PROFILE", "paper")
    assert gm.get_profile() == "paper" and "paper" in gm.describe_profile("gpt-pydoc")
    with pytest.raises(ValueError, match="unknown task"):
        gm.task_config("resnet-digits")


def test_paper_sizes_follow_table_2():
    vit = gm.task_config("vit-digits", "paper").model
    assert (vit["embed_dim"], vit["depth"], vit["num_heads"], vit["embed_dim"] * vit["mlp_ratio"]) == (256, 6, 8, 512)
    assert gm.task_config("vit-cifar10", "paper").model["depth"] == 6
    for task in ("gpt-pydoc", "gpt-shakespeare"):
        gpt = gm.task_config(task, "paper").model
        assert (gpt["n_embd"], gpt["n_layer"], gpt["n_head"], gpt["n_inner"]) == (256, 6, 4, 1024)
    for task in gm.TASKS:
        for profile in ("quick", "standard", "paper"):
            c = gm.task_config(task, profile)
            assert c.task == task and c.profile == profile and (c.epochs or c.steps) > 0
