"""cffi build script (out-of-line API mode), wired into pyproject.toml.

The cdef is csrc/tpb.h itself, less its preprocessor lines, so the header
is the single contract between C and Python.

TPB_SANITIZE=1 in the environment builds the helper with AddressSanitizer
and UndefinedBehaviorSanitizer (make test-asan, into build/asan; a process
loading it needs the ASan runtime preloaded, see the Makefile).  Without
it the flags are the production ones.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
SOURCES = [
    "ring.c",
    "txq.c",
    "txring.c",
    "bridge.c",
    "bridge_open.c",
    "csum.c",
    "gre.c",
    "encap.c",
    "segment.c",
    "udpgso.c",
    "coalesce.c",
    "decap.c",
    "reasm.c",
    "keepalive.c",
    "pop.c",
    "pop_rx.c",
    "pop_learn.c",
    "pop_ka.c",
    "pop_conf.c",
    "xsk.c",
    "xsk_open.c",
    "pop_tx.c",
    "pop_gro.c",
    "shed.c",
    "bpf.c",
]
_DEFINE = re.compile(r"#define\s+\w+\s+-?\d+\s*(/\*.*\*/\s*)?$")


def cdef_text(header: Path) -> str:
    """The header with every '#' line dropped but integer #defines."""
    keep = []
    for line in header.read_text().splitlines():
        if line.lstrip().startswith("#") and not _DEFINE.match(line.strip()):
            continue
        keep.append(line)
    return "\n".join(keep)


COMPILE_ARGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"]
LINK_ARGS: list[str] = []
if os.environ.get("TPB_SANITIZE") == "1":
    SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
    COMPILE_ARGS = [*COMPILE_ARGS[1:], "-O1", "-g", "-fno-omit-frame-pointer", *SANITIZE]
    LINK_ARGS = SANITIZE

ffibuilder = FFI()
ffibuilder.cdef(cdef_text(CSRC / "tpb.h"))
ffibuilder.set_source(
    "tpb._tpb_c",
    '#include <stdint.h>\n#include <stddef.h>\n#include "tpb.h"\n',
    sources=[str((CSRC / s).relative_to(ROOT)) for s in SOURCES],
    include_dirs=[str(CSRC.relative_to(ROOT))],
    extra_compile_args=COMPILE_ARGS,
    extra_link_args=LINK_ARGS,
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
