"""`python -m rll_kernels.env_report`: versions and usable backends, for bug reports."""

from __future__ import annotations

import platform
import shutil
import subprocess


def report() -> str:
    import torch

    import rll_kernels
    from rll_kernels import _extension
    from rll_kernels._backends import available_backends

    lines = [
        f"rll_kernels {rll_kernels.__version__}",
        f"python {platform.python_version()} on {platform.machine()} ({platform.system()})",
        f"torch {torch.__version__} (cuda {torch.version.cuda}, cuda available: {torch.cuda.is_available()})",
        f"threads {torch.get_num_threads()}",
    ]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton: not installed")
    nvcc = shutil.which("nvcc")
    if nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        lines.append(f"nvcc: {out[-1] if out else nvcc}")
    else:
        lines.append("nvcc: not found")
    lines.append(f"C++ extension: {_extension.extension_status()}")
    cap = _extension.cpu_capability()
    if cap is not None:
        lines.append(f"CPU kernels: {cap[0]} build, {cap[1]} (RLL_KERNELS_CPU_CAPABILITY=avx2 forces AVX2)")
    cuda_in = _extension.has_kernel("rll_fwd", "cuda")
    lines.append(f"CUDA kernels compiled in: {'yes (experimental)' if cuda_in else 'no'}")
    lines.append("backends (device, loss, backend):")
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        for loss, table in available_backends(dev).items():
            for name, reason in table.items():
                state = "usable" if reason is None else "unusable: " + reason
                lines.append(f"  {dev:4s} {loss:10s} {name:9s} {state}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
