"""python -m bitbasis: the same as the `bitbasis` command."""
import sys

from .cli import main

sys.exit(main())
