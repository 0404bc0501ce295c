"""``python -m fastadam.bench``: the same as ``python -m fastadam bench``."""

import sys

from .cli import main

sys.exit(main(prog="python -m fastadam.bench"))
