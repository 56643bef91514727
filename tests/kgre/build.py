#!/usr/bin/env python3
"""Builds the kernel + initramfs of the kernel GRE peer VM (see README.md).

Standard library only, so it runs with the system python3 before any venv.
Idempotent: when the artifacts in the cache folder were built from the same
inputs, it only says so.  Downloads nothing but Debian packages, with
``apt-get download`` (nothing is installed on the host).

    tests/kgre/build.sh [--force] [--cache DIR]

Cache folder: $TPB_KGRE_CACHE, else /var/cache/tpb-kgre as root, else
~/.cache/tpb-kgre.  Kernel package: $TPB_KGRE_KERNEL_PKG (default
linux-image-amd64, the Debian 12 kernel meta package; its dependency names the
real linux-image-6.1.0-N-amd64).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    from ._cpio import CpioWriter
except ImportError:  # run as a script
    from _cpio import CpioWriter  # type: ignore[no-redef]

HERE = Path(__file__).resolve().parent
KERNEL_META_PKG = os.environ.get("TPB_KGRE_KERNEL_PKG", "linux-image-amd64")
BUSYBOX_PKG = "busybox-static"
# The modules loaded at boot, with their dependencies (read from each module's
# .modinfo "depends=", as the .deb ships no modules.dep) loaded first.
MODULES = ["virtio_pci", "virtio_net", "ip_gre", "8021q", "ip6_gre", "fou"]
MODULES += os.environ.get("TPB_KGRE_EXTRA_MODULES", "").split()
# Host binaries copied into the VM with their shared libraries (Debian 12 host,
# Debian 12 libraries: they run on any kernel).  "ip" is the real iproute2.
REQUIRED_BINS = ["ip"]
OPTIONAL_BINS = ["iperf3", "tcpdump", "ethtool", "ss"]
INPUTS = ["build.py", "_cpio.py", "init.sh", "echod.c"]

KERNEL = "vmlinuz"
INITRD = "initrd.base.gz"
MANIFEST = "manifest.json"


def cache_dir() -> Path:
    env = os.environ.get("TPB_KGRE_CACHE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/tpb-kgre")
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tpb-kgre"


def inputs_stamp() -> str:
    h = hashlib.sha256()
    for name in INPUTS:
        h.update(name.encode() + b"\0" + (HERE / name).read_bytes())
    h.update(repr((KERNEL_META_PKG, MODULES, REQUIRED_BINS, OPTIONAL_BINS)).encode())
    return h.hexdigest()[:16]


def read_manifest(cache: Path | None = None) -> dict | None:
    try:
        return json.loads(((cache or cache_dir()) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _log(msg: str) -> None:
    print(f"kgre-build: {msg}", flush=True)


def _run(cmd: list[str], **kw: object) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if p.returncode != 0:
        raise SystemExit(f"kgre-build: {' '.join(cmd)} failed ({p.returncode}):\n"
                         f"{p.stdout}{p.stderr}")
    return p.stdout


def _apt_depends(pkg: str) -> list[str]:
    p = subprocess.run(["apt-cache", "depends", pkg], capture_output=True, text=True)
    return re.findall(r"^\s+Depends: (\S+)$", p.stdout, re.M) if p.returncode == 0 else []


def resolve_kernel_pkg() -> str:
    """The real kernel package behind the meta package (or the name given)."""
    if re.match(r"linux-image-\d", KERNEL_META_PKG):
        return KERNEL_META_PKG
    for attempt in range(2):
        deps = [d for d in _apt_depends(KERNEL_META_PKG) if re.match(r"linux-image-\d", d)]
        if deps:
            return deps[0]
        if attempt == 0:
            _log("apt-cache knows no kernel package yet: apt-get update")
            _run(["apt-get", "update", "-qq"])
    raise SystemExit(f"kgre-build: apt-cache depends {KERNEL_META_PKG} names no linux-image-*")


def apt_download(pkg: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    have = sorted(dest.glob(f"{pkg}_*.deb"))
    if have:
        return have[-1]
    _log(f"apt-get download {pkg}")
    cmd = ["apt-get", "download", "-o", "APT::Sandbox::User=root", "-q", pkg]
    p = subprocess.run(cmd, cwd=dest, capture_output=True, text=True)
    if p.returncode != 0:
        _log("apt-get download failed; apt-get update and retry")
        _run(["apt-get", "update", "-qq"])
        _run(cmd, cwd=dest)
    have = sorted(dest.glob(f"{pkg}_*.deb"))
    if not have:
        raise SystemExit(f"kgre-build: apt-get download {pkg} left no .deb in {dest}")
    return have[-1]


def _deb_version(deb: Path) -> str:
    return _run(["dpkg-deb", "-f", str(deb), "Version"]).strip()


def module_depends(ko: Path) -> list[str]:
    m = re.search(rb"(?:^|\x00)depends=([^\x00]*)", ko.read_bytes())
    if not m:
        return []
    return [d.replace("-", "_") for d in m.group(1).decode().split(",") if d]


def module_closure(index: dict[str, Path], wanted: list[str]) -> list[str]:
    """Dependency order (dependencies first) of ``wanted`` and all they need."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(m: str, chain: tuple[str, ...]) -> None:
        if m in seen:
            return
        if m not in index:
            raise SystemExit(f"kgre-build: module {m} (needed by {' <- '.join(chain)}) "
                             "is not in the kernel package (built in? check its config)")
        seen.add(m)
        for d in module_depends(index[m]):
            visit(d, (m, *chain))
        order.append(m)

    for m in wanted:
        visit(m, ())
    return order


def ldd_closure(binary: str) -> list[str]:
    """The binary's shared libraries and loader, as real files (paths as ldd prints)."""
    out = _run(["ldd", binary])
    libs = []
    for line in out.splitlines():
        m = re.search(r"=>\s+(/\S+)", line) or re.match(r"\s*(/\S+)", line)
        if m:
            libs.append(m.group(1))
    return libs


def compile_echod(workdir: Path) -> Path | None:
    cc = shutil.which("gcc") or shutil.which("cc")
    if not cc:
        _log("WARNING: no C compiler: the VM gets no tpb-echod (TCP/UDP echo and sink)")
        return None
    out = workdir / "tpb-echod"
    _run([cc, "-O2", "-Wall", "-o", str(out), str(HERE / "echod.c")])
    return out


def build(cache: Path, force: bool = False) -> dict:
    stamp = inputs_stamp()
    old = read_manifest(cache)
    if (not force and old and old.get("stamp") == stamp
            and (cache / KERNEL).is_file() and (cache / INITRD).is_file()):
        _log(f"up to date in {cache} (kernel {old['kernel_release']})")
        return old
    t0 = time.monotonic()
    cache.mkdir(parents=True, exist_ok=True)
    debs = cache / "debs"
    kpkg = resolve_kernel_pkg()
    kdeb = apt_download(kpkg, debs)
    bdeb = apt_download(BUSYBOX_PKG, debs)

    with tempfile.TemporaryDirectory(prefix="kgre-build-", dir=cache) as tmp:
        tmpd = Path(tmp)
        kx, bx = tmpd / "kernel", tmpd / "busybox"
        _log(f"extracting {kdeb.name}")
        _run(["dpkg-deb", "-x", str(kdeb), str(kx)])
        _run(["dpkg-deb", "-x", str(bdeb), str(bx)])
        vmlinuz = sorted((kx / "boot").glob("vmlinuz-*"))
        if not vmlinuz:
            raise SystemExit(f"kgre-build: no /boot/vmlinuz-* in {kdeb.name}")
        release = vmlinuz[0].name[len("vmlinuz-"):]
        moddir = kx / "lib" / "modules" / release
        index = {p.name[:-3].replace("-", "_"): p for p in moddir.rglob("*.ko")}
        order = module_closure(index, MODULES)
        _log(f"kernel {release}; modules in load order: {' '.join(order)}")

        cpio = CpioWriter()
        for d in ("bin", "sbin", "usr/bin", "usr/sbin", "lib/modules", "etc", "proc", "sys",
                  "dev", "tmp", "run", "root", "var/log", "lib64", "lib/x86_64-linux-gnu"):
            cpio.mkdir(d)
        cpio.chardev("dev/console", 5, 1)
        cpio.chardev("dev/null", 1, 3, 0o666)
        cpio.file("init", (HERE / "init.sh").read_bytes(), 0o755)
        cpio.file("bin/busybox", (bx / "bin" / "busybox").read_bytes(), 0o755)
        cpio.symlink("bin/sh", "busybox")  # for /init's #!; the rest at boot
        cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        cpio.file("etc/group", b"root:x:0:\n")
        cpio.file("etc/hostname", b"kgre\n")
        for m in order:
            cpio.file(f"lib/modules/{m}.ko", index[m].read_bytes())
        cpio.file("lib/modules/load.order", ("\n".join(order) + "\n").encode())

        bins: dict[str, str] = {}
        echod = compile_echod(tmpd)
        if echod:
            bins["tpb-echod"] = str(echod)
        for name in REQUIRED_BINS + OPTIONAL_BINS:
            path = shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
            if path:
                bins[name] = path
            elif name in REQUIRED_BINS:
                raise SystemExit(f"kgre-build: {name} is needed on the host (apt-get install "
                                 "iproute2)")
            else:
                _log(f"note: no {name} on the host, the VM goes without")
        libs: set[str] = set()
        for name, path in bins.items():
            dest = "usr/sbin/" + name if name in ("ip", "ss", "ethtool", "tcpdump") \
                else "usr/bin/" + name
            cpio.file(dest, Path(path).resolve().read_bytes(), 0o755)
            libs.update(ldd_closure(path))
        for lib in sorted(libs):
            data = Path(lib).resolve().read_bytes()
            if lib.startswith("/lib64/"):
                cpio.file(lib.lstrip("/"), data, 0o755)
            else:  # every library in the one folder ld.so and LD_LIBRARY_PATH search
                cpio.file("lib/x86_64-linux-gnu/" + Path(lib).name, data, 0o755)
        cpio.symlink("usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu")

        raw = cpio.getvalue()
        (cache / (INITRD + ".tmp")).write_bytes(gzip.compress(raw, 6, mtime=0))
        shutil.copyfile(vmlinuz[0], cache / (KERNEL + ".tmp"))
        shutil.copyfile(kx / "boot" / f"config-{release}", cache / "config")

    os.replace(cache / (KERNEL + ".tmp"), cache / KERNEL)
    os.replace(cache / (INITRD + ".tmp"), cache / INITRD)
    manifest = {
        "stamp": stamp,
        "kernel_package": kpkg,
        "kernel_version": _deb_version(kdeb),
        "kernel_release": release,
        "busybox_version": _deb_version(bdeb),
        "modules": order,
        "binaries": sorted(bins),
        "libraries": sorted(libs),
        "initrd_bytes": (cache / INITRD).stat().st_size,
        "initrd_unpacked_bytes": len(raw),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (cache / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    # Old kernel packages left by an earlier build (a newer kernel came out).
    for deb in debs.glob("linux-image-*.deb"):
        if deb != kdeb:
            deb.unlink()
    _log(f"built in {time.monotonic() - t0:.1f}s: {cache / KERNEL}, {cache / INITRD} "
         f"({manifest['initrd_bytes'] // 1024} KiB)")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    ap.add_argument("--cache", type=Path, default=None, help="artifact folder")
    args = ap.parse_args(argv)
    build(args.cache or cache_dir(), force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
