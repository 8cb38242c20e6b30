"""examples/train_fashion_mnist.py: a shortened run on scikit-learn's digits must improve held-out
Recall@1 over the untrained network; data loading (IDX files, missing data) behaves."""

import gzip
import struct

import numpy as np
import pytest
import torch
from scripts import load_script


@pytest.fixture(scope="module")
def demo():
    return load_script("examples/train_fashion_mnist.py")


@pytest.fixture(scope="module")
def common():
    return load_script("examples/_common.py")


@pytest.mark.slow
def test_digits_training_improves_heldout_recall(demo, tmp_path):
    threads = torch.get_num_threads()
    try:
        res = demo.main(
            [
                "--dataset",
                "digits",
                "--losses",
                "rll",
                "--protocols",
                "standard",
                "--steps",
                "60",
                "--threads",
                "1",
                "--quiet",
                "--json",
                str(tmp_path / "r.json"),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    rows = res["standard"]
    assert set(rows) == {"raw pixels", "untrained network", "RLLFused"}
    before, after = rows["untrained network"], rows["RLLFused"]
    assert after["R@1"] > before["R@1"] + 0.03, rows
    assert after["NMI"] > before["NMI"], rows
    for m in rows.values():
        assert 0.0 <= m["R@1"] <= m["R@2"] <= m["R@4"] <= m["R@8"] <= 1.0
    assert (tmp_path / "r.json").stat().st_size > 0


def test_table_and_loss_availability(demo):
    msgs = []
    facs = demo.loss_factories(["rll", "softtriple", "osm", "contrastive"], msgs.append)
    names = [n for n, _ in facs]
    assert names[0] == "RLLFused" and "PML ContrastiveLoss" in names
    import rll_kernels

    for attr, key in (
        ("SoftTripleFused", "SoftTripleFused"),
        ("WeightedContrastiveFused", "WeightedContrastiveFused"),
    ):
        assert (key in names) == hasattr(rll_kernels, attr)
        assert any(key in m for m in msgs) != hasattr(rll_kernels, attr)
    for _name, make in facs:  # every factory builds a loss that trains on a small batch
        loss = make(3, 8)(torch.randn(12, 8, requires_grad=True), torch.arange(3).repeat(4))
        assert loss.dim() == 0 and torch.isfinite(loss)
    table = demo.format_table(
        {"standard": {"raw pixels": {"R@1": 0.5, "R@2": 0.6, "R@4": 0.7, "R@8": 0.8, "NMI": 0.25}}}
    )
    assert "| standard | raw pixels | 50.0 | 60.0 | 70.0 | 80.0 | 25.0 |" in table
    with pytest.raises(SystemExit):
        demo.parse_args(["--losses", "nope"])


def _write_idx(path, arr, compress):
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(data)


def test_idx_reader_and_missing_data(common, tmp_path, monkeypatch):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    _write_idx(str(tmp_path / "a.gz"), imgs, True)
    _write_idx(str(tmp_path / "b"), imgs[:, 0, 0], False)
    np.testing.assert_array_equal(common.read_idx(str(tmp_path / "a.gz")), imgs)
    np.testing.assert_array_equal(common.read_idx(str(tmp_path / "b")), imgs[:, 0, 0])
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        common.read_idx(str(tmp_path / "bad"))
    # a complete directory (mixed .gz / plain) is found and loaded
    d = tmp_path / "fm"
    d.mkdir()
    _write_idx(str(d / "train-images-idx3-ubyte.gz"), imgs, True)
    _write_idx(str(d / "train-labels-idx1-ubyte"), np.arange(5), False)
    _write_idx(str(d / "t10k-images-idx3-ubyte.gz"), imgs[:3], True)
    _write_idx(str(d / "t10k-labels-idx1-ubyte.gz"), np.arange(3), True)
    train, test = common.load_fashion_mnist(str(d))
    assert train.x.shape == (5, 1, 28, 28) and test.y.tolist() == [0, 1, 2]
    assert abs(float(train.x.mean())) < 1e-4
    # missing files: no install attempted for an explicit --data; the message asks for --data DIR
    called = []
    monkeypatch.setattr(common, "_try_install_debian_package", lambda: called.append(1) or False)
    with pytest.raises(SystemExit, match="--data DIR"):
        common.locate_fashion_mnist(str(tmp_path / "nowhere"))
    assert not called
    # the default location: an install is attempted when the files are missing, then the message
    monkeypatch.setattr(common, "FASHION_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit, match="apt-get install dataset-fashion-mnist"):
        common.locate_fashion_mnist(None)
    assert called == [1]


def test_pk_batches(common):
    labels = torch.tensor([0] * 20 + [1] * 3 + [2] * 15)
    batches = list(common.pk_batches(labels, 2, 4, 10, seed=0))
    assert len(batches) == 10
    for b in batches:
        lab = labels[b]
        assert b.numel() == 8 and torch.unique(lab).numel() == 2
        assert all(int((lab == c).sum()) == 4 for c in torch.unique(lab))
    again = list(common.pk_batches(labels, 2, 4, 10, seed=0))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    with pytest.raises(ValueError, match="p must be at most"):
        next(common.pk_batches(labels, 4, 2, 1, seed=0))
