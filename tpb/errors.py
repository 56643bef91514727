"""The exceptions that reach the user as a single line, and their exit
status.

A systemd unit can tell the two apart (RestartPreventExitStatus=2):
restarting cannot fix a configuration, but may well outlive a failure.
"""

from __future__ import annotations

EXIT_CONFIG = 2
EXIT_RUNTIME = 1


class TpbError(Exception):
    """A problem the operator can fix (a setting, a flag, a file, a missing
    or down interface, no privileges): one line, exit status 2."""

    exit_code = EXIT_CONFIG


class RuntimeFailure(TpbError):
    """Something that went wrong while running with a configuration that
    was fine: the forwarding loop failed, a port went away, the counters
    could not be written at exit.  One line, exit status 1."""

    exit_code = EXIT_RUNTIME
