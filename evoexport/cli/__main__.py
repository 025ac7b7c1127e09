"""`python -m evoexport.cli ...`"""
import sys

from . import main

sys.exit(main())
