"""Entry point for `ray job submit --working-dir . -- python jobs/build_shards.py SOURCE OUT_DIR --format FMT ...`.

The arguments and behaviour of `vitpipe shards build` (it parses them with the same parser). On a cluster
SOURCE and OUT_DIR may also be s3:// URLs: an S3 source is copied to the node's disk first (a key with a
file extension, e.g. a Parquet file or a CIFAR archive, as a file; anything else as a prefix), and shards
built for an S3 destination are uploaded once they are complete and checked. The AWS CLI does the copying
with the node's instance role. Training then reads each split with a template such as
``data.train: "pipe:aws s3 cp s3://BUCKET/shards/NAME/train/{name} -"``, printed at the end.
"""

import subprocess
import sys
import tempfile
from pathlib import Path

# `python jobs/build_shards.py` puts jobs/ on sys.path, not the project root that holds `pipeline`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import build_parser  # noqa: E402


def _aws_s3(*args: str) -> None:
    subprocess.run(["aws", "s3", *args, "--only-show-errors"], check=True)


def _s3_prefix_in_use(url: str) -> bool:
    listing = subprocess.run(["aws", "s3", "ls", f"{url}/"], capture_output=True, text=True)
    return listing.returncode == 0 and bool(listing.stdout.strip())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(["shards", "build", *(sys.argv[1:] if argv is None else argv)])
    destination = args.out_dir.rstrip("/") if args.out_dir.startswith("s3://") else None
    if destination and _s3_prefix_in_use(destination) and not args.overwrite:
        print(f"build_shards: {destination} already holds files; pass --overwrite to replace them", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="build-shards-") as staging:
        if args.source.startswith("s3://"):
            name = args.source.rstrip("/").rsplit("/", 1)[-1]
            local = Path(staging, "source", name)
            _aws_s3("cp" if Path(name).suffix else "sync", args.source, str(local))
            args.source = str(local)
        if destination:
            args.out_dir = str(Path(staging, "shards"))
        status = args.func(args)  # `vitpipe shards build`: builds, checks, prints the summary
        if status != 0 or not destination:
            return status
        _aws_s3("sync", "--delete", args.out_dir, destination)
        print(f"uploaded to {destination}; in a training config:")
        for split in sorted(p.name for p in Path(args.out_dir).iterdir() if p.is_dir()):
            print(f'  {split}: "pipe:aws s3 cp {destination}/{split}/{{name}} -"')
    return 0


if __name__ == "__main__":
    sys.exit(main())
