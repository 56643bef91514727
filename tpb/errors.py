"""The exceptions that reach the user as a single line, and their exit
status.

A systemd unit can tell them apart (RestartPreventExitStatus=2):
restarting cannot fix a configuration, but may well outlive a failure
(1) or a port that is not there yet (3).
"""

from __future__ import annotations

EXIT_CONFIG = 2
EXIT_RUNTIME = 1
# A port missing or down at start: nothing in the configuration is wrong,
# the host is not ready yet (a NIC whose driver or rename comes late, a
# link someone will raise). Restarting may well fix it.
EXIT_NOT_READY = 3


class TpbError(Exception):
    """A problem the operator can fix (a setting, a flag, a file, a missing
    or down interface, no privileges): one line, exit status 2."""

    exit_code = EXIT_CONFIG


class RuntimeFailure(TpbError):
    """Something that went wrong while running with a configuration that
    was fine: the forwarding loop failed, a port went away, the counters
    could not be written at exit.  One line, exit status 1."""

    exit_code = EXIT_RUNTIME
