"""Checks that only a GPU can run, driven by ``tests/gpu/check_gpu.py`` (``make check-gpu``).

Each check is a function ``check_*() -> str`` in a module here: it returns a one-line detail
when it passes, raises ``SkipCheck`` with a one-line reason when it cannot apply on this
machine, and raises anything else when it fails. The runner calls each in its own process.
pytest does not collect these modules (none is named ``test_*``); ``tests/test_check_gpu.py``
tests the runner on the CPU.
"""


class SkipCheck(Exception):
    """This check does not apply here; the message says why, in one line."""
