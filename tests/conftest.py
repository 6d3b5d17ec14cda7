"""Test setup: the quick profile and a private checkpoint cache for the session, unless the caller
set them (set at import, so notebook kernels started by nbval inherit them too)."""
import atexit
import os
import shutil
import tempfile

import pytest
import torch

os.environ.setdefault("GLMC_PROFILE", "quick")
if not os.environ.get("GLMC_CACHE"):
    os.environ["GLMC_CACHE"] = tempfile.mkdtemp(prefix="glmc-cache-")
    atexit.register(shutil.rmtree, os.environ["GLMC_CACHE"], ignore_errors=True)


@pytest.fixture(autouse=True, scope="module")
def one_thread(request):
    """The tiny-model solver tests (align, many, widths, the align command, distributed) run on one intra-op thread: there threads
    only cost time, a lot on a shared, oversubscribed machine."""
    if request.module.__name__.rsplit(".", 1)[-1] not in ("test_align", "test_many", "test_widths",
                                                          "test_align_command", "test_distributed"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
