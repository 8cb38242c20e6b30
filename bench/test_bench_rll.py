"""pytest-benchmark cases for regression tracking: ``pytest bench/ --benchmark-only``.

Small shapes (a few seconds in all on 2 cores), forward + backward, so that a slowdown of the fused
kernels shows up in ``--benchmark-compare``. Kept out of ``make test``, which collects ``tests/`` only.
Compare runs with ``pytest bench/ --benchmark-only --benchmark-autosave`` then
``--benchmark-compare --benchmark-compare-fail=median:10%``.
"""

from __future__ import annotations

import pytest
import torch

from bench.cases import Case
from bench.providers import Provider, Unsupported, all_providers, make_inputs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = [
    Case(N=256, D=128, semantics="paper"),
    Case(N=256, D=128, semantics="pml"),
    Case(N=1024, D=128, semantics="paper"),
    Case(N=64, M=4096, D=128, semantics="paper"),
]
# torch.compile and KeOps are left out: their JIT compile would dominate a regression run
PROVIDERS = [p for p in all_providers(DEVICE, with_keops=False) if p.fused or p.name in ("reference", "pml")]


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("case", CASES, ids=[c.key() for c in CASES])
@pytest.mark.parametrize("provider", PROVIDERS, ids=[p.name for p in PROVIDERS])
def test_rll_full(benchmark, provider: Provider, case: Case) -> None:
    """Forward + backward of one provider on one case."""
    x = make_inputs(case, DEVICE)
    try:
        fn = provider.build(case, x)
    except Unsupported as e:  # PML with a bank
        pytest.skip(str(e))

    def full() -> float:
        x.emb.grad = None
        loss = fn()
        loss.backward()
        _sync()
        return float(loss)

    benchmark.group = case.key()
    benchmark.extra_info.update(
        {"N": case.N, "M": case.M, "D": case.D, "semantics": case.semantics, "device": str(DEVICE)}
    )
    loss = benchmark.pedantic(full, rounds=5, iterations=1, warmup_rounds=1)
    assert loss == loss  # not NaN


@pytest.mark.parametrize("semantics", ["paper", "pml"])
def test_rll_forward_fused(benchmark, semantics: str) -> None:
    """Forward only (no grad) of the default fused backend."""
    import rll_kernels

    case = Case(N=1024, D=128, semantics=semantics)
    x = make_inputs(case, DEVICE)

    def fwd() -> float:
        with torch.no_grad():
            out = rll_kernels.ranked_list_loss(x.emb, x.labels, semantics=semantics)
        _sync()
        return float(out)

    benchmark.group = "forward_" + case.key()
    benchmark.pedantic(fwd, rounds=5, iterations=1, warmup_rounds=1)
