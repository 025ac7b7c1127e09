"""Pictures of what the selections keep (panels.py)."""
from .panels import show  # noqa: F401
