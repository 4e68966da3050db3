"""`python -m dsd.tracks.names < requests.json`: parameter names (and aliases such as `first_conv`) of models
built on the meta device, or why a model section cannot be built.

Run by `dsd.tracks.parameter_names` for the config checks, so that reading a config never imports torch.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from dsd import hparams, tracks
from dsd.core.masks import aliases
from dsd.errors import DSDError


def main() -> int:
    for request in json.load(sys.stdin):
        track = tracks.get(request["track"])
        try:
            model = track.model.meta_model(hparams.parse(track.config.Model, request["model"], "model"))
            names = {"names": [n for n, _ in model.named_parameters()], "aliases": aliases(model)}
        except (DSDError, ValueError, TypeError) as err:  # an unknown arch, a bad constructor argument
            names = {"error": str(err).splitlines()[0] if str(err) else type(err).__name__}
        path = Path(request["path"])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(names))
        tmp.replace(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
