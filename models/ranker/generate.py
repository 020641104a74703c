"""Generate the ranker's synthetic embedding table now, rather than on a worker's first load.

    python models/ranker/generate.py [MODEL_DIR]

Writes ``MODEL_DIR/<version>/<table>.npy`` for every version, with the rows and seed that
MODEL_DIR/config.json declares (default: this folder), unless a file of that shape is there.
The table is synthetic: standard normals from a fixed seed, so its scores mean nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tasks.metadata import load_metadata  # noqa: E402
from tasks.repository import sharded_table  # noqa: E402


def main() -> None:
    model_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
    metadata = load_metadata(model_dir)
    for version in metadata.versions:
        table = sharded_table(metadata, version)
        print(f"{table.path}: {table.shape[0]} x {table.shape[1]} {table.dtype}")


if __name__ == "__main__":
    main()
