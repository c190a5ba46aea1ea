"""``python -m kvpress.longbench ...`` (and ``torchrun --nproc-per-node N -m kvpress.longbench ...``):
the same as ``kvpress longbench ...``."""

import sys

from kvpress.longbench.command import main

if __name__ == "__main__":
    sys.exit(main(["longbench", *sys.argv[1:]]))
