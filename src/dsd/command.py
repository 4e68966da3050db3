"""The `dsd` console script. The CLI is the pipeline's and needs its packages; a core-only install (torch and
NumPy alone) gets one line saying so instead of a traceback."""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from dsd.cli import main as cli_main
    except ModuleNotFoundError as err:
        print(
            f"dsd: error: the dsd command needs the pipeline's packages ({err.name} is not installed): "
            "pip install 'dsd-training[pipeline]'",
            file=sys.stderr,
        )
        return 2
    return cli_main()
