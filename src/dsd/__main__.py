import os
import sys

from dsd import prefork

code = prefork.run(sys.argv[1:])  # in a child of the warm interpreter, when there is one (see dsd.prefork)
if code is None:
    from dsd.cli import main

    code = main()
# Everything a command writes is closed by now (checkpoints, metrics, the wandb run). Skipping the interpreter's
# teardown of torch saves about a second per process: minutes over the hundred jobs of a pipeline.
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
