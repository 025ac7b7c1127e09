"""Checking a build against the PyTorch reference: the report (report.py), decisions
judged as decisions (decisions.py), the tolerances per precision (tolerances.py), and the
report in words (text.py)."""
from .report import validate  # noqa: F401
from .text import format_report, print_report  # noqa: F401
