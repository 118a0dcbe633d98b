"""The docs' commands, run as written: every ``bash`` block of docs/guide.md, in order, in one scratch folder.

The folder holds what the guide assumes: ``my_images/`` (the digits as PNG files in class folders per
split, standing in for the user's images) and the repository's ``tune_spaces/`` and ``configs/``. The
commands join a real token-authenticated Ray head through ``RAY_ADDRESS``, as on a cluster, instead of
each starting its own local Ray (the same code path, minus a start per command). Other docs pages are
checked for links that lead nowhere and for ``bash`` blocks the test would not run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.datasets import digits_arrays

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
GUIDE = DOCS / "guide.md"
BASH_BLOCK = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)


def bash_blocks(page: Path) -> list[str]:
    return BASH_BLOCK.findall(page.read_text())


def write_image_folder(root: Path) -> None:
    """The digits as 8x8 PNGs: train/val/test, one folder per class (names "zero" ... "nine")."""
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    images, labels = digits_arrays(8)
    order = np.random.default_rng(0).permutation(len(labels))
    splits = {"train": order[:1300], "val": order[1300:1500], "test": order[1500:]}
    for split, indices in splits.items():
        for i in indices:
            folder = root / split / names[labels[i]]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(folder / f"{i:04d}.png")


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_every_command_of_the_guide_runs_as_written(ray_head, tmp_path):
    write_image_folder(tmp_path / "my_images")
    for shared in ("tune_spaces", "configs"):
        (tmp_path / shared).symlink_to(REPO / shared)
    env = {**ray_head.env, "RAY_ADDRESS": ray_head.gcs_address,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    env.pop("MLFLOW_TRACKING_URI", None)  # the guide's default: sqlite:///<cwd>/mlflow.db
    blocks = bash_blocks(GUIDE)
    assert len(blocks) >= 10
    for number, block in enumerate(blocks, start=1):
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=400)  # fmt: skip
        assert done.returncode == 0, f"block {number} of {GUIDE.name}:\n{block}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"

    # what the guide says the commands leave behind
    evaluation = json.loads((tmp_path / "eval" / "my-lsla" / "evaluation.json").read_text())
    assert evaluation["metrics"]["top1"] > 10.0  # 10 classes: better than chance after 3 epochs of 1,300 images
    assert json.loads((tmp_path / "export" / "my-lsla" / "export.json").read_text())["format"] == "onnx"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("my-images").experiment_id])}
    assert {"my-lsla", "my-lsla-profiled", "my-lsla-tuned", "my-student"} <= set(runs)
    assert runs["my-lsla-tuned"].data.tags["vitpipe.init_from"] == "models:/my-lsla/1"
    assert runs["my-student"].data.tags["vitpipe.distill_teacher_version"] == "1"
    assert {a.path for a in client.list_artifacts(runs["my-lsla-profiled"].info.run_id, "profile")} >= {
        "profile/rank0.trace.json", "profile/rank1.trace.json"}  # fmt: skip
    assert client.get_metric_history(runs["my-lsla"].info.run_id, "val/top1")[-1].step == 3  # resumed to epoch 3


def test_docs_links_resolve_and_only_the_guide_has_commands_to_run():
    pages = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith(("http://", "https://")):
                assert (page.parent / target).exists(), f"{page.name}: link to {target} leads nowhere"
    # a bash block elsewhere in docs/ would not be run by the test above: keep commands in the guide
    for page in sorted(DOCS.glob("*.md")):
        if page != GUIDE:
            assert bash_blocks(page) == [], f"{page.name} has bash blocks: move them to the guide (run by a test)"
