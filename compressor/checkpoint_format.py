"""What makes a model folder a compressor checkpoint: the `compression_config` entry of its config.json.

This sits below both checkpoint.py (which writes and loads checkpoints) and the model sources (which refuse
a checkpoint as a recipe's model), so neither imports the other. docs/checkpoint-format.md describes the
folder in full.
"""

import json
from pathlib import Path

FORMAT_VERSION = 1  # raised when a checkpoint written now could not be read by an older compressor
VERSION = "0.1.0"  # this package's version (pyproject.toml), recorded in every checkpoint


def read_compression_config(path: str | Path) -> dict | None:
    """The checkpoint's compression_config, or None for a plain model folder."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        return None
    return json.loads(config_path.read_text()).get("compression_config")
