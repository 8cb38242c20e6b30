"""Set-up shared by every test: the Triton interpreter, one seed per test, and the backend
parametrisation taken from the registry.

A test that takes an argument named ``backend`` is run once per fused backend of its loss (every
backend of ``rll_kernels._backends.BACKENDS[loss]`` except ``auto`` and ``reference``), with the id
of the backend. The loss is the test's folder (``tests/rll``, ``tests/softtriple``, ``tests/osm``)
or ``@pytest.mark.loss("rll")``. ``@pytest.mark.backends("reference", "cpp")`` picks the backends
instead. A backend that ``rll_kernels.available_backends(device, loss)`` reports unusable is a skip
that says the registry's reason, never a silent pass. The ``device`` fixture is the device the
backend runs on here: CPU tensors for ``cpp``, CUDA tensors for ``cuda``, and for ``triton`` and
``reference`` the GPU when there is one, else CPU tensors (Triton through its interpreter).
"""

from __future__ import annotations

import math
import os
import zlib

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter when there is no GPU. The variable is
# read when @triton.jit decorates a kernel, so it must be set before rll_kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from devices import DEVICE_OF  # (the conftest directory is on sys.path)

import rll_kernels  # (after TRITON_INTERPRET)
from rll_kernels._backends import BACKENDS, LOSSES


def fused_backends(loss: str) -> list[str]:
    """The fused backends of ``loss``: every backend the loss accepts but ``auto`` and ``reference``."""
    return [b for b in BACKENDS[loss] if b not in ("auto", "reference")]


def backend_params(loss: str, names=None) -> list:
    """``pytest.param`` per backend of ``loss`` (default: the fused ones), a skip with the registry's
    reason where the backend cannot run on its device here."""
    params = []
    for name in fused_backends(loss) if names is None else names:
        dev = DEVICE_OF[name]
        why = rll_kernels.available_backends(dev, loss)[name]
        marks = [pytest.mark.interpreter] if name == "triton" and dev == "cpu" else []
        if why is not None:
            marks.append(pytest.mark.skip(reason=f"{loss} backend {name!r} unusable on {dev} here: {why}"))
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def _loss_of(definition) -> str:
    marker = definition.get_closest_marker("loss")
    if marker is not None:
        return marker.args[0]
    folder = definition.path.parent.name
    if folder not in LOSSES:
        raise pytest.UsageError(f"{definition.nodeid}: a 'backend' argument needs @pytest.mark.loss(...)")
    return folder


def _parametrized_explicitly(definition, name: str) -> bool:
    for m in definition.iter_markers("parametrize"):
        names = m.args[0]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        if name in names:
            return True
    return False


def pytest_configure(config):
    config.addinivalue_line("markers", "loss(name): the loss whose backends parametrise 'backend'")
    config.addinivalue_line("markers", "backends(*names): the backends that parametrise 'backend'")


def pytest_generate_tests(metafunc):
    if "backend" not in metafunc.fixturenames or _parametrized_explicitly(metafunc.definition, "backend"):
        return
    marker = metafunc.definition.get_closest_marker("backends")
    names = list(marker.args) if marker is not None else None
    metafunc.parametrize("backend", backend_params(_loss_of(metafunc.definition), names))


@pytest.fixture
def device(backend) -> str:
    """The device of ``backend``'s tensors in this run (see the module docstring)."""
    return DEVICE_OF[backend]


# The Triton interpreter runs each program of a kernel launch in Python, so its time grows with the
# number of (32-query x 64-gallery x 64-feature) tiles. A case with more tiles than this is too slow
# for it on CPU tensors: skipped there with this reason, it runs on a GPU.
INTERPRETER_TILES = 6


@pytest.fixture
def skip_if_interpreted_above(backend, device):
    """``check(n, m, d)``: skip when ``backend`` runs in the Triton interpreter and an N x M problem
    with D features has more than ``INTERPRETER_TILES`` tiles."""

    def check(n: int, m: int, d: int) -> None:
        tiles = math.ceil(n / 32) * math.ceil(m / 64) * math.ceil(d / 64)
        if backend == "triton" and device == "cpu" and tiles > INTERPRETER_TILES:
            pytest.skip(
                f"too slow for the Triton interpreter (N={n}, M={m}, D={d}: {tiles} tiles); runs on a GPU"
            )

    return check


@pytest.fixture(autouse=True)
def _seed(request):
    # a distinct, reproducible seed per test (from its id); RLL_TEST_SEED shifts all of them, so a
    # run with a new value draws fresh inputs everywhere
    seed = (zlib.crc32(request.node.nodeid.encode()) + int(os.environ.get("RLL_TEST_SEED", "0"))) % (2**31)
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield
