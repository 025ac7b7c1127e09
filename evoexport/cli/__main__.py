"""`python -m evoexport.cli ...`"""
from . import _entry

_entry()
