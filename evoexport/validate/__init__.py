"""Checking a build against the PyTorch reference: the report (report.py), decisions
judged as decisions (decisions.py), and the tolerances per precision (tolerances.py)."""
from .report import format_report, print_report, validate  # noqa: F401
