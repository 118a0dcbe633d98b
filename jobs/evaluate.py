"""Entry point for `python jobs/evaluate.py MODEL_URI --shards DIR [--split test]` (no Ray needed).

Runs the same code as `vitpipe evaluate`, e.g. on the head node after a sweep registered its champion:
`python jobs/evaluate.py models:/vit_lsla_nano@champion --shards s3-mounted/fmnist --tracking-uri http://HEAD:5000`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
