"""``python -m pipemax.ctl``: the control socket's client (pipemax/ops/ctl.py)."""
import sys

from pipemax.ops.ctl import main

if __name__ == "__main__":
    sys.exit(main())
