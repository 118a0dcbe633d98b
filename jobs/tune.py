"""Entry point for `ray job submit --working-dir . -- python jobs/tune.py --space tune_spaces/X.yaml --config FILE`.

Runs the same code as `vitpipe tune` (the Tune driver runs on the head node, trials on the workers).
"""

import sys
from pathlib import Path

# `python jobs/tune.py` puts jobs/ on sys.path, not the project root that holds `pipeline`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.tune.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
