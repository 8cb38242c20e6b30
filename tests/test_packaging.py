"""Packaging: the C++ extension is tied to the torch it was built against.

setup.py records that torch in rll_kernels/_build_info.json; rll_kernels/_extension.py loads the
extension only under the same torch major.minor. A mismatched, missing or broken extension leaves
``import rll_kernels`` working (reference and Triton backends usable, "auto" falls back with a
warning), ``backend="cpp"`` of every loss raising a RuntimeError that names both torch versions
and the rebuild command, and env_report saying so (docs/semantics.md §6). Each case runs in a subprocess on a
copy of the installed package. An isolated ``pip install .`` next to another torch stops before
compiling and says to use ``--no-build-isolation``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import rll_kernels
from rll_kernels import _extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.dirname(os.path.abspath(rll_kernels.__file__))
HAS_TRITON = importlib.util.find_spec("triton") is not None
OTHER_TORCH = "2.11.0" if not torch.__version__.startswith("2.11.") else "2.12.0"

# Run in a subprocess against a copy of the package: import, the state of the extension, every loss
# on the reference and cpp backends, "auto", and (with triton) the Triton backend in the interpreter.
_PROBE = textwrap.dedent(
    """
    import json, os, sys, warnings
    # an editable install's finder would resolve rll_kernels._C in the checkout: only the copy counts
    sys.meta_path[:] = [m for m in sys.meta_path if not getattr(m, "__module__", "").startswith("__editable")]
    import torch
    import rll_kernels
    from rll_kernels import _extension, env_report

    def cpp_error(fn):
        try:
            fn("cpp")
        except RuntimeError as e:
            return str(e)
        return None

    emb = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.arange(13) % 4
    centers = torch.randn(8, 4 * 2, dtype=torch.float64)
    losses = {
        "rll": lambda b: rll_kernels.ranked_list_loss(emb, labels, backend=b),
        "softtriple": lambda b: rll_kernels.soft_triple_loss(
            emb, labels, centers, centers_per_class=2, backend=b
        ),
        "osm": lambda b: rll_kernels.weighted_contrastive_loss(emb, labels, backend=b),
    }
    out = {"file": rll_kernels.__file__, "has_c": _extension.HAS_C}
    out["reason"] = _extension.cpp_unavailable_reason()
    out["report"] = env_report.report()
    ref = losses["rll"]("reference")
    (grad,) = torch.autograd.grad(ref, emb)
    out["reference_finite"] = bool(torch.isfinite(ref) and torch.isfinite(grad).all())
    out["cpp_errors"] = {name: cpp_error(fn) for name, fn in losses.items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = losses["rll"]("auto")
    out["auto_equals_reference"] = bool(torch.equal(auto, ref))
    out["auto_warnings"] = [str(w.message) for w in caught]
    if os.environ.get("CHECK_TRITON") == "1":
        tri = losses["rll"]("triton")
        out["triton_close"] = bool(torch.allclose(tri, ref, rtol=1e-9, atol=1e-12))
    print("PROBE " + json.dumps(out))
    """
)


def _copy_package(dest_root, keep_extension: bool = True) -> str:
    """A copy of the installed package under dest_root (compiled extension and build record dropped
    unless keep_extension)."""
    skip = ["__pycache__"] + ([] if keep_extension else ["_C.*", _extension.BUILD_INFO_FILE])
    dest = os.path.join(dest_root, "rll_kernels")
    shutil.copytree(PKG, dest, ignore=shutil.ignore_patterns(*skip))
    return dest


def _probe(pkg_root) -> dict:
    """Run _PROBE with pkg_root first on sys.path; its JSON result."""
    env = dict(os.environ, TRITON_INTERPRET="1", CHECK_TRITON="1" if HAS_TRITON else "0")
    env["PYTHONPATH"] = os.pathsep.join([str(pkg_root)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    r = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=pkg_root, env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stdout + r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("PROBE "))
    out = json.loads(line[len("PROBE ") :])
    assert os.path.dirname(out["file"]) == os.path.join(str(pkg_root), "rll_kernels")
    return out


def _assert_unusable(out: dict, built: str, cause: str) -> None:
    """The package works without its extension and every message says why."""
    running = torch.__version__
    assert not out["has_c"]
    reason = out["reason"]
    for text in (cause, built, running, "-m pip install --no-build-isolation"):
        assert text in reason, f"{text!r} not in {reason!r}"
    assert out["reference_finite"]
    for name, err in out["cpp_errors"].items():  # the whole reason, rebuild command included
        assert err is not None and reason in err, (name, err)
    assert out["auto_equals_reference"]
    assert any("falling back" in w for w in out["auto_warnings"]), out["auto_warnings"]
    if HAS_TRITON:
        assert out["triton_close"]
    report_line = next(ln for ln in out["report"].splitlines() if ln.startswith("C++ extension:"))
    assert "NOT usable" in report_line and built in report_line and running in report_line, report_line
    assert "--no-build-isolation" in report_line


@pytest.mark.skipif(not _extension.HAS_C, reason="needs a built extension to copy")
def test_extension_built_for_another_torch_is_not_loaded(tmp_path):
    _copy_package(tmp_path)
    info = dict(_extension.BUILD_INFO, torch=OTHER_TORCH)
    with open(tmp_path / "rll_kernels" / _extension.BUILD_INFO_FILE, "w") as f:
        json.dump(info, f)
    _assert_unusable(_probe(tmp_path), OTHER_TORCH, f"built against torch {OTHER_TORCH}")


def test_missing_extension(tmp_path):
    _copy_package(tmp_path, keep_extension=False)
    _assert_unusable(_probe(tmp_path), "none (nothing was compiled)", "it is not built")


@pytest.mark.skipif(not _extension.HAS_C, reason="needs a built extension to copy")
def test_extension_that_fails_to_load(tmp_path):
    """Same torch in the build record, but the file does not load: the import error and both versions."""
    dest = _copy_package(tmp_path)
    (so,) = [f for f in os.listdir(dest) if f.startswith("_C.")]
    with open(os.path.join(dest, so), "wb") as f:
        f.write(b"not an ELF file")
    _assert_unusable(_probe(tmp_path), _extension.BUILD_INFO["torch"], "it failed to load")


def test_checkout_built_for_another_torch():
    """The real thing under `make compat`: the checkout's in-place extension (built by .venv's torch)
    imported by this other torch."""
    path = os.path.join(ROOT, "rll_kernels", _extension.BUILD_INFO_FILE)
    if os.path.join(ROOT, "rll_kernels") == PKG or not os.path.exists(path):
        pytest.skip("the package under test is the checkout itself (make compat runs this case)")
    with open(path) as f:
        built = json.load(f)["torch"]
    if built.split(".")[:2] == torch.__version__.split(".")[:2]:
        pytest.skip(f"the checkout was built against this torch ({built})")
    _assert_unusable(_probe(ROOT), built, f"built against torch {built}")


def test_build_record_names_the_running_torch():
    if not _extension.HAS_C:
        pytest.skip(f"no usable extension: {_extension.cpp_unavailable_reason()}")
    assert _extension.BUILD_INFO is not None, "setup.py wrote no _build_info.json beside the extension"
    assert _extension.BUILD_INFO["torch"] == torch.__version__
    assert _extension.cpp_unavailable_reason() is None
    assert f"built against torch {torch.__version__}" in _extension.extension_status()


@pytest.mark.parametrize(
    ("built", "cuda_kernels", "expect"),
    [
        ("{same}", False, None),
        ("{same_minor}.99", False, None),  # same major.minor: loaded (patch releases keep the ABI)
        (OTHER_TORCH, False, "built against torch"),
        ("3.0.0", False, "built against torch"),
    ],
)
def test_abi_rule(built, cuda_kernels, expect):
    same_minor = ".".join(torch.__version__.split(".")[:2])
    info = {
        "torch": built.format(same=torch.__version__, same_minor=same_minor),
        "cuda_kernels": cuda_kernels,
    }
    why = _extension._abi_mismatch(info)
    assert (why is None) if expect is None else (expect in why and torch.__version__ in why), why


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch has CUDA")
def test_abi_rule_cuda_kernels_need_a_cuda_torch():
    why = _extension._abi_mismatch({"torch": torch.__version__, "cuda_kernels": True})
    assert why is not None and "no CUDA" in why


def _fake_env_with_torch(root, version: str) -> tuple[str, str]:
    """(python, site-packages) of a venv (no pip) holding a stand-in torch package of that version."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    py = os.path.join(str(root), "bin", "python")
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    os.makedirs(os.path.join(site, "torch"))
    with open(os.path.join(site, "torch", "__init__.py"), "w") as f:
        f.write("raise ImportError('stand-in torch: never imported by the build')\n")
    with open(os.path.join(site, "torch", "version.py"), "w") as f:
        f.write(f"__version__ = {version!r}\ncuda = None\n")
    return py, site


@pytest.mark.slow
def test_isolated_build_next_to_another_torch_stops_before_compiling(tmp_path):
    """`pip install .` (build isolation on) into an environment that has another torch: pip puts the
    [build-system] torch into its build environment, then setup.py stops with the command to run."""
    py, site = _fake_env_with_torch(tmp_path / "env", OTHER_TORCH)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", ROOT],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        cwd=tmp_path,
    )
    elapsed = time.perf_counter() - t0
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "stopping before compiling" in out and OTHER_TORCH in out, out
    assert "pip install --no-build-isolation ." in out, out
    assert "building 'rll_kernels._C'" not in out, out
    assert not [n for n in os.listdir(site) if n.startswith("rll_kernels")], "something was installed"
    print(f"isolated build stopped after {elapsed:.0f} s (pip's build environment included)")
