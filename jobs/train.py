"""Entry point for `ray job submit --working-dir . -- python jobs/train.py --config configs/X.yaml [--set k=v]`.

Runs the same code as `vitpipe train`; also works locally (`python jobs/train.py --config ...`).
"""

import sys
from pathlib import Path

# `python jobs/train.py` puts jobs/ on sys.path, not the project root that holds `pipeline`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.train.launcher import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
