"""The errors a user can cause, each with its exit status. Anything else is a bug (status 1).

=======  ==========================================================================
status   meaning
=======  ==========================================================================
0        success (also a run stopped by SIGTERM/SIGINT after writing its checkpoint)
1        a bug: a traceback, please report it
2        config or usage (ConfigError, DataError, a CLI's bad argument)
3        non-finite loss or gradient under ``train.on_nonfinite=stop`` (NonFiniteError)
4        checkpoint or disk: a checkpoint that cannot be used (CheckpointError), a write that
         failed for lack of space, permission or a read-only filesystem (DiskError)
=======  ==========================================================================

Every rank raises the same error (main-only work shares its outcome, see
``distributed.run_on_main_all_ranks``), and the entry point prints it as one ``error:`` line.
"""

from __future__ import annotations

import errno


class UserError(Exception):
    """A problem the user can fix; the message is one line naming the culprit and the fix."""

    exit_status = 2


class ConfigError(UserError, ValueError):
    """A configuration or usage problem, reported as one line naming the key."""


class DataError(UserError, RuntimeError):
    """A dataset that cannot be loaded; the message says where and how to fix it."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the message names the file or key and the fix."""

    exit_status = 4


class DiskError(UserError):
    """A file of the run that could not be written: no space, no permission, read-only."""

    exit_status = 4


class NonFiniteError(UserError, RuntimeError):
    """A NaN or Inf loss or gradient, seen identically on every rank."""

    exit_status = 3


USER_ERRORS: dict[str, type[UserError]] = {
    cls.__name__: cls
    for cls in (ConfigError, DataError, CheckpointError, DiskError, NonFiniteError)
}

_DISK_FIXES = {
    errno.ENOSPC: "free space or set output_dir elsewhere",
    errno.EDQUOT: "free space within your quota or set output_dir elsewhere",
    errno.EFBIG: "raise the file size limit (ulimit -f) or set output_dir elsewhere",
    errno.EROFS: "set output_dir to a writable filesystem",
    errno.EACCES: "fix the permissions or set output_dir elsewhere",
    errno.EPERM: "fix the permissions or set output_dir elsewhere",
    errno.EIO: "check the disk, or set output_dir elsewhere",
    errno.EEXIST: "a file stands where a folder is needed: move it or set output_dir elsewhere",
    errno.ENOTDIR: "a file stands where a folder is needed: move it or set output_dir elsewhere",
}


DISK_ERRNOS = frozenset(_DISK_FIXES)
"""OSError numbers that mean the disk or its permissions, not our code: ``is_disk_error``."""


def is_disk_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_ERRNOS


def disk_error(exc: OSError, writing: str) -> DiskError:
    """``exc`` (raised while writing ``writing``, e.g. "checkpoint runs/x/checkpoints/step-…")
    as one line naming the cause, what was written and the fix."""
    reason = (exc.strerror or type(exc).__name__).lower()
    fix = _DISK_FIXES.get(exc.errno, "check the disk, or set output_dir elsewhere")
    return DiskError(f"{reason} while writing {writing}; {fix}")
