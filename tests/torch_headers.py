"""The C++ headers of other torch releases, for the compile checks (tests/test_cuda_compile.py).

The C++/CUDA sources must compile against the headers of the torch a GPU machine has (2.11.0:
the GPU machine we borrow) as well as against the installed one. ``python tests/torch_headers.py``
downloads each release's wheel once (``pip download torch==V --no-deps``, about 530 MB, 6-15 s on
this machine), keeps only its ``torch/include/`` (39 MB of files) in the cache and deletes the wheel:

    ${RLL_TORCH_HEADERS_CACHE:-${XDG_CACHE_HOME:-~/.cache}/rll_kernels/torch-headers}/torch-V/include

``make test`` runs it (``make torch-headers``) before the tests; a test whose headers are missing
is skipped, saying so.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

VERSIONS = ("2.11.0",)  # besides the installed torch: the GPU machine's (torch 2.11.0+cu130)
STAMP = ".complete"


def cache_dir() -> Path:
    env = os.environ.get("RLL_TORCH_HEADERS_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rll_kernels" / "torch-headers"


def include_dirs(version: str) -> list[str] | None:
    """The -I directories of torch ``version``'s headers (as torch.utils.cpp_extension.include_paths
    gives them for the installed torch), or None if they were not fetched."""
    root = cache_dir() / f"torch-{version}"
    if not (root / STAMP).exists():
        return None
    inc = root / "include"
    return [str(inc), str(inc / "torch" / "csrc" / "api" / "include")]


def fetch(version: str) -> Path:
    """Download torch ``version``'s wheel, keep its headers, delete the wheel; returns the folder."""
    root = cache_dir() / f"torch-{version}"
    if (root / STAMP).exists():
        return root
    t0 = time.time()
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:  # beside the result: the move is a rename
        # --no-cache-dir: the wheel is wanted once, not a second time in pip's own cache
        cmd = [sys.executable, "-m", "pip", "download", f"torch=={version}", "--no-deps", "--no-cache-dir"]
        subprocess.run([*cmd, "-d", tmp, "-q"], check=True)
        (wheel,) = Path(tmp).glob("torch-*.whl")
        size, t_dl = wheel.stat().st_size, time.time() - t0
        shutil.rmtree(root, ignore_errors=True)
        with zipfile.ZipFile(wheel) as z:
            members = [m for m in z.namelist() if m.startswith("torch/include/")]
            z.extractall(Path(tmp) / "x", members=members)
        root.mkdir(parents=True)
        (Path(tmp) / "x" / "torch" / "include").rename(root / "include")
        (root / STAMP).write_text(f"{wheel.name}\n")
    kept = sum(f.stat().st_size for f in (root / "include").rglob("*") if f.is_file())
    print(
        f"torch {version}: {wheel.name} ({size / 1e6:.0f} MB) downloaded in {t_dl:.0f} s; "
        f"headers kept ({kept / 1e6:.0f} MB in {root}) in {time.time() - t0:.0f} s in all"
    )
    return root


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("versions", nargs="*", default=list(VERSIONS))
    args = ap.parse_args(argv)
    for v in args.versions:
        root = fetch(v)
        print(f"torch {v} headers: {root / 'include'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
