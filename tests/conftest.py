import os

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter when there is no GPU. The variable is
# read when @triton.jit decorates a kernel, so it must be set before rll_kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed(request):
    # a fresh but reproducible seed per test (derived from its name), printed on failure
    seed = abs(hash(request.node.nodeid)) % (2**31)
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield
