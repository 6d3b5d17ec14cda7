"""Test setup: the quick profile and a private checkpoint cache for the session, unless the caller
set them (set at import, so notebook kernels started by nbval inherit them too)."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("GLMC_PROFILE", "quick")
if not os.environ.get("GLMC_CACHE"):
    os.environ["GLMC_CACHE"] = tempfile.mkdtemp(prefix="glmc-cache-")
    atexit.register(shutil.rmtree, os.environ["GLMC_CACHE"], ignore_errors=True)
