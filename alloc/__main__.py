"""``python -m bitalloc …`` (and ``torchrun --nproc-per-node N -m bitalloc probe …``): the bitalloc command."""
import sys

from .cli import main

sys.exit(main())
