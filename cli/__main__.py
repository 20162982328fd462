"""`python -m cli ...` runs the same code as the `specialist-router` console script."""
import sys

from cli import main

sys.exit(main())
