"""``python -m clipforge``: the command line."""
import sys

from clipforge.cli import main

sys.exit(main())
