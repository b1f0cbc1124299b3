"""``lema`` with ``{local_rank}`` in its arguments replaced by this rank's LOCAL_RANK, for torchrun.

It stands in for a multi-node run where every node reads its own copy of ``--data``: the
tests give one rank a corrupt copy.
"""

from __future__ import annotations

import os
import sys

from lema.cli import main

if __name__ == "__main__":
    local_rank = os.environ["LOCAL_RANK"]
    main([arg.replace("{local_rank}", local_rank) for arg in sys.argv[1:]], prog_name="lema")
