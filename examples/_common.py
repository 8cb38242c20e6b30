"""Helpers for the examples: image data sets (Fashion-MNIST IDX files, scikit-learn digits), a small
convnet embedding, P x K batch sampling and batched embedding."""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_DEB = "dataset-fashion-mnist"
FASHION_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class Split:
    """Images (N, 1, H, W) float32, standardised, and their int64 labels (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def subset(self, classes: Sequence[int]) -> Split:
        keep = torch.isin(self.y, torch.as_tensor(list(classes)))
        return Split(self.x[keep], self.y[keep])


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or not."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4]!r})")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=_IDX_DTYPES[data[2]], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {arr.size} values")
    return arr.reshape(shape)


def _find(data_dir: str, stem: str) -> Optional[str]:
    for name in (stem + ".gz", stem):
        p = os.path.join(data_dir, name)
        if os.path.exists(p):
            return p
    return None


def _try_install_debian_package() -> bool:
    """apt-get install the Debian package holding Fashion-MNIST; True if it ran successfully."""
    if shutil.which("apt-get") is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    print(f"Fashion-MNIST not found; installing the Debian package {FASHION_DEB} ...", file=sys.stderr)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        res = subprocess.run(
            ["apt-get", "install", "-y", "-q", FASHION_DEB],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            timeout=600,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"apt-get failed: {exc}", file=sys.stderr)
        return False
    if res.returncode != 0:
        print(f"apt-get install {FASHION_DEB} failed:\n{res.stderr[-1000:]}", file=sys.stderr)
    return res.returncode == 0


def locate_fashion_mnist(data_dir: Optional[str], allow_install: bool = True) -> str:
    """The directory with the four Fashion-MNIST IDX files.

    ``data_dir=None`` means the Debian package's directory, installing the package when it is
    missing and this process can (root and apt-get). Exits with a message asking for ``--data DIR``
    when the files cannot be found.
    """
    wanted = data_dir or FASHION_DIR
    if all(_find(wanted, s) for s in FASHION_FILES.values()):
        return wanted
    if (
        data_dir is None
        and allow_install
        and _try_install_debian_package()
        and all(_find(wanted, s) for s in FASHION_FILES.values())
    ):
        return wanted
    names = ", ".join(f"{s}[.gz]" for s in FASHION_FILES.values())
    raise SystemExit(
        f"Fashion-MNIST IDX files not found in {wanted}.\n"
        f"Install them with `apt-get install {FASHION_DEB}` (Debian/Ubuntu, as root), or download "
        f"them and pass --data DIR, a directory holding {names}."
    )


def _standardise(train: np.ndarray, *others: np.ndarray) -> tuple[torch.Tensor, ...]:
    mean, std = float(train.mean()), float(train.std())
    return tuple(
        torch.from_numpy(((a - mean) / std).astype(np.float32)).unsqueeze(1) for a in (train,) + others
    )


def load_fashion_mnist(data_dir: Optional[str] = None, allow_install: bool = True) -> tuple[Split, Split]:
    """Fashion-MNIST as (train 60,000, test 10,000) splits of 1 x 28 x 28 images."""
    d = locate_fashion_mnist(data_dir, allow_install)
    arr = {k: read_idx(_find(d, s)) for k, s in FASHION_FILES.items()}
    tx, vx = _standardise(arr["train_x"].astype(np.float32) / 255.0, arr["test_x"].astype(np.float32) / 255.0)
    return (
        Split(tx, torch.from_numpy(arr["train_y"].astype(np.int64))),
        Split(vx, torch.from_numpy(arr["test_y"].astype(np.int64))),
    )


def load_digits(test_fraction: float = 0.4, seed: int = 0) -> tuple[Split, Split]:
    """scikit-learn's 1,797 8 x 8 digits, split per class into train and held-out test."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    ds = sk_digits()
    x = ds.images.astype(np.float32) / 16.0
    xtr, xte, ytr, yte = train_test_split(
        x, ds.target, test_size=test_fraction, random_state=seed, stratify=ds.target
    )
    tx, vx = _standardise(xtr, xte)
    return Split(tx, torch.from_numpy(ytr.astype(np.int64))), Split(
        vx, torch.from_numpy(yte.astype(np.int64))
    )


class ConvEmbedding(nn.Module):
    """Three conv-BN-ReLU blocks (``width``, 2 ``width``, 4 ``width`` channels; 2 x 2 max-pools after
    the first two), average pooling to ``pool`` x ``pool`` and a linear layer to ``embedding_size``.
    Works for any input of at least 4 x 4 pixels (28 x 28 Fashion-MNIST, 8 x 8 digits)."""

    def __init__(self, embedding_size: int = 64, width: int = 16, pool: int = 4) -> None:
        super().__init__()

        def block(cin: int, cout: int, downsample: bool) -> nn.Sequential:
            layers = [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]
            return nn.Sequential(*layers, *([nn.MaxPool2d(2)] if downsample else []))

        self.features = nn.Sequential(
            block(1, width, True),
            block(width, 2 * width, True),
            block(2 * width, 4 * width, False),
            nn.AdaptiveAvgPool2d(pool),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * width * pool * pool, embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@torch.no_grad()
def embed(model: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Embeddings of ``x`` in eval mode, in batches."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])
    model.train(was_training)
    return out


def pk_batches(labels: torch.Tensor, p: int, k: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """``steps`` batches of indices: ``p`` random classes, ``k`` random items of each (without
    replacement inside a class when it has at least ``k`` items)."""
    gen = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels)
    if p > classes.numel():
        raise ValueError(f"p must be at most the number of training classes ({classes.numel()}), got {p}")
    members = [torch.nonzero(labels == c).squeeze(1) for c in classes]
    for _ in range(steps):
        picked = torch.randperm(classes.numel(), generator=gen)[:p]
        batch = []
        for c in picked.tolist():
            m = members[c]
            if m.numel() >= k:
                batch.append(m[torch.randperm(m.numel(), generator=gen)[:k]])
            else:
                batch.append(m[torch.randint(m.numel(), (k,), generator=gen)])
        yield torch.cat(batch)
