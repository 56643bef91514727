#!/usr/bin/env python3
"""The inputs of the appliance image, as one hash (standard library only).

`image/build.sh` writes it into `out/manifest.json`; `tests/test_image.py`
compares it with the tree it runs from, so an image built from other
sources is reported stale instead of being tested as if it were this one.

Inputs: everything `make image` puts into the image from this repository
(TPB's package and C helper, the appliance files, the recipe, the
Makefile). The TPB_IMAGE_* settings a build used are recorded in the
manifest beside it.

    python3 image/stamp.py          # prints the hash
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIRS = ("image", "appliance", "tpb", "csrc")
FILES = ("pyproject.toml", "setup.py", "Makefile")
SKIP_DIRS = {"out", "__pycache__"}
SKIP_SUFFIXES = (".so", ".pyc", ".o")
SKIP_FILES = {"tpb/_tpb_c.c", "image/README.md"}


def inputs(root: Path = ROOT) -> list[Path]:
    out = [root / f for f in FILES]
    for d in DIRS:
        for dirpath, dirnames, filenames in os.walk(root / d):
            dirnames[:] = sorted(n for n in dirnames if n not in SKIP_DIRS)
            for name in sorted(filenames):
                p = Path(dirpath) / name
                rel = p.relative_to(root).as_posix()
                if name.endswith(SKIP_SUFFIXES) or rel in SKIP_FILES:
                    continue
                out.append(p)
    return out


def stamp(root: Path = ROOT) -> str:
    h = hashlib.sha256()
    for p in inputs(root):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


if __name__ == "__main__":
    print(stamp())
