"""User-facing errors.

Anything raised as `EvoExportError` is a problem with the user's input or environment
(bad flag, broken checkpoint, tampered build). The CLI prints it as one line and exits
non-zero; everything else is a bug and keeps its traceback.
"""


class EvoExportError(Exception):
    """An error the user can fix; its message is printed as-is, on one line."""
