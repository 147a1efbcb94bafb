"""python -m bitbasis.cli"""
import sys

from . import main

sys.exit(main())
