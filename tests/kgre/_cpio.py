"""A minimal writer for the "newc" cpio format the Linux initramfs unpacker reads.

Pure Python, so neither the build nor a test needs the cpio tool, and device
nodes (/dev/console) can be put in the archive without being root.
"""

from __future__ import annotations

import stat

_TRAILER = "TRAILER!!!"


class CpioWriter:
    """Collects entries in memory; ``getvalue()`` returns the finished archive."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1
        self._dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
               nlink: int = 1) -> None:
        name = name.strip("/")
        namez = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08X}" for v in (
            self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(namez), 0))
        self._ino += 1
        buf = hdr.encode() + namez
        buf += b"\0" * (-len(buf) % 4)
        buf += data
        buf += b"\0" * (-len(buf) % 4)
        self._parts.append(buf)

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        """Adds ``path`` and its missing parents as directories."""
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in self._dirs:
                self._dirs.add(d)
                self._entry(d, stat.S_IFDIR | mode, nlink=2)

    def _parent(self, path: str) -> None:
        parent = path.strip("/").rpartition("/")[0]
        if parent:
            self.mkdir(parent)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._parent(path)
        self._entry(path, stat.S_IFREG | mode, data)

    def symlink(self, path: str, target: str) -> None:
        self._parent(path)
        self._entry(path, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._parent(path)
        self._entry(path, stat.S_IFCHR | mode, rdev=(major, minor))

    def getvalue(self) -> bytes:
        trailer = CpioWriter()
        trailer._entry(_TRAILER, 0, nlink=1)
        out = b"".join(self._parts) + trailer._parts[0]
        return out + b"\0" * (-len(out) % 512)
