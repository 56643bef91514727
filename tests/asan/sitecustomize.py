"""make test-asan: imported by every Python process of the run (PYTHONPATH).

The C helper a process loads is the sanitized build in TPB_C_DIR (before
tpb's own).  The ASan runtime, which must come first in a process, is
preloaded by the interpreter the run uses (.venv/bin/python-asan, which
the tests' sys.executable is, so the Python processes they start get it
too); it is not handed on to what Python starts otherwise: ip, nft,
tcpdump, qemu, prometheus... run as they always do.
"""

import os

os.environ.pop("LD_PRELOAD", None)
if os.environ.get("TPB_C_DIR"):
    import tpb

    tpb.__path__.insert(0, os.environ["TPB_C_DIR"])
