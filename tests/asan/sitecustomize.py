"""make test-asan: imported by every Python process of the run (PYTHONPATH).

The C helper a process loads is the sanitized build in TPB_C_DIR (before
tpb's own).  The ASan runtime must come first in a process that loads it:
the run starts Python with it preloaded (LD_PRELOAD), and each Python
process hands the preload on only to the Python processes it starts (a
command line with sys.executable in it: `ip netns exec NS python -m tpb`),
not to ip, nft, tcpdump, qemu, prometheus... which run as they always do.
"""

import os
import subprocess
import sys
from typing import Any

_PRELOAD = os.environ.pop("LD_PRELOAD", None)
_PATHS = (str, bytes, os.PathLike)


def _starts_python(args: Any) -> bool:
    """sys.executable as an argument, or as a word of one (`sh -c "exec env
    ... PYTHON -m tpb run"`, a shell=True command line)."""
    argv = [args] if isinstance(args, _PATHS) else list(args)
    return any(isinstance(a, _PATHS) and sys.executable in os.fsdecode(a).split() for a in argv)


if _PRELOAD:
    _popen_init = subprocess.Popen.__init__

    def _init(self: subprocess.Popen, args: Any, *a: Any, **kw: Any) -> None:
        if _starts_python(args):
            env = kw.get("env")
            kw["env"] = {**(os.environ if env is None else env), "LD_PRELOAD": _PRELOAD}
        _popen_init(self, args, *a, **kw)

    subprocess.Popen.__init__ = _init  # type: ignore[method-assign]

# Only a process started with the ASan runtime loads the sanitized helper:
# another one (TPB installed elsewhere, run by a shell) loads its own.
if _PRELOAD and os.environ.get("TPB_C_DIR"):
    import tpb

    tpb.__path__.insert(0, os.environ["TPB_C_DIR"])
