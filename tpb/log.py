"""Logging: one line per event (never per packet) on stderr, `tpb: message`.

Scripts and tests read these lines (`tpb: bridging ...` says TPB is
forwarding), so the text after `tpb: ` is the interface; the level only
decides whether a line is shown (`--log-level`, `log_level`).

Under systemd, stderr goes to the journal as a stream; journald takes a
`<N>` prefix (sd-daemon(3)) as the line's syslog priority, so `journalctl
-p warning` and the colours work.  The prefix is added only when stderr
really is the stream systemd set up: JOURNAL_STREAM names its device and
inode (systemd.exec(5)), and a redirected stderr must not get it.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("tpb")

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# sd-daemon(3) / syslog(3) priorities
PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


def journal_stream(stream: object = None) -> bool:
    """Whether `stream` (stderr by default) is the journal stream systemd
    passed us (JOURNAL_STREAM=DEV:INODE)."""
    want = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = want.partition(":")
    if not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())  # type: ignore[attr-defined]
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class _Handler(logging.Handler):
    """Writes to whatever sys.stderr is at the time, one line per record
    (a multi-line message gets the prefix on each line), flushed at once:
    a reader waiting for a line must not wait for a buffer to fill."""

    def __init__(self) -> None:
        super().__init__()
        self.journal = journal_stream()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            prio = f"<{PRIORITY.get(record.levelno, 6)}>" if self.journal else ""
            text = record.getMessage()
            if record.exc_info and record.levelno <= logging.DEBUG:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            out = "".join(f"{prio}tpb: {line}\n" for line in text.splitlines() or [""])
            sys.stderr.write(out)
            sys.stderr.flush()
        except (OSError, ValueError):
            pass  # stderr gone (closed pipe): nothing left to tell anyone


def setup(level: str = "info") -> None:
    """Route the `tpb` logger to stderr; safe to call again (tests, reload)."""
    # A failing handler must not print a traceback of its own.
    logging.raiseExceptions = False
    for h in list(log.handlers):
        if isinstance(h, _Handler):
            log.removeHandler(h)
    log.addHandler(_Handler())
    log.propagate = False
    set_level(level)


def set_level(level: str) -> None:
    log.setLevel(LEVELS[level])
