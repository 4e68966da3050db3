"""`python -m dsd.tracks.names < requests.json`: parameter names of models built on the meta device.

Run by `dsd.tracks.parameter_names` for the config checks, so that reading a config never imports torch.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from dsd import hparams, tracks


def main() -> int:
    for request in json.load(sys.stdin):
        track = tracks.get(request["track"])
        model = hparams.parse(track.config.Model, request["model"], "model")
        names = track.model.parameter_names(model)
        path = Path(request["path"])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(names))
        tmp.replace(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
