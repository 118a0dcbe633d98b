"""Building shards from the four formats (round trips), verify, inspect, the CLI, and bad inputs."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import re
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.data import ManifestError, SourceError, build_shards, read_manifest, verify_shards
from pipeline.data.samples import iter_shard
from tests.datasets import UNEVEN_SHARDS, corrupt_sample, digits_arrays, make_digits_shards, truncate_shard

pytestmark = pytest.mark.timeout(120)


def read_back(split_dir) -> dict[str, tuple[np.ndarray, int, bytes, str]]:
    """key -> (pixels, label, stored bytes, stored extension) of every sample of a built split."""
    samples = {}
    for url in read_manifest(split_dir).shard_urls():
        for sample in iter_shard(url):
            ext = next(k for k in sample if not k.startswith("__") and k != "cls")
            pixels = np.array(Image.open(io.BytesIO(sample[ext])))
            assert sample["__key__"] not in samples
            samples[sample["__key__"]] = (pixels, int(sample["cls"]), sample[ext], ext)
    return samples


def index(key: str) -> tuple[str, int]:
    split, number = key.split("-")
    return split, int(number)


def assert_round_trip(root, source_splits: dict, *, carved_val: bool):
    """Every source sample comes back once, in the expected split, with its pixels and label."""
    seen = {split: set() for split in source_splits}
    for split in ("train", "val", "test"):
        if not (root / split).exists():
            continue
        for key, (pixels, label, _, _) in read_back(root / split).items():
            source_split, i = index(key)
            assert source_split == ("train" if (split == "val" and carved_val) else split)
            images, labels = source_splits[source_split]
            assert np.array_equal(pixels, images[i]), key
            assert label == labels[i], key
            seen[source_split].add(i)
    for split, (_, labels) in source_splits.items():
        assert seen[split] == set(range(len(labels)))


# --------------------------------------------------------------------------------------------- idx


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def digits():
    images, labels = digits_arrays()
    return {"train": (images[:500], labels[:500]), "test": (images[500:620], labels[500:620])}


def test_idx_round_trip_gz_and_plain(tmp_path, digits):
    src = tmp_path / "mnist-like"
    src.mkdir()
    write_idx(src / "train-images-idx3-ubyte.gz", digits["train"][0])
    write_idx(src / "train-labels-idx1-ubyte.gz", digits["train"][1])
    write_idx(src / "t10k-images-idx3-ubyte", digits["test"][0])  # plain, not gzipped
    write_idx(src / "t10k-labels-idx1-ubyte", digits["test"][1])
    built = build_shards(src, tmp_path / "out", format="idx", samples_per_shard=64, val_fraction=0.2, progress=False)
    assert built.num_samples == {"train": 400, "val": 100, "test": 120}
    assert built.classes == tuple(str(i) for i in range(10))
    assert_round_trip(tmp_path / "out", digits, carved_val=True)
    train = built["train"]
    assert [s.num_samples for s in train.shards] == [64] * 6 + [16]
    assert train.image.formats == {"png": 400} and train.image_mode == "L" and train.image_size == (8, 8)
    assert list(train.class_counts) == np.bincount(
        [label for _, label, _, _ in read_back(tmp_path / "out" / "train").values()], minlength=10
    ).tolist()


def test_val_carving_and_shards_are_deterministic(tmp_path, digits):
    src = tmp_path / "src"
    src.mkdir()
    write_idx(src / "train-images-idx3-ubyte", digits["train"][0])
    write_idx(src / "train-labels-idx1-ubyte", digits["train"][1])
    a = build_shards(src, tmp_path / "a", format="idx", seed=3, progress=False)
    b = build_shards(src, tmp_path / "b", format="idx", seed=3, progress=False)
    c = build_shards(src, tmp_path / "c", format="idx", seed=4, progress=False)
    assert [s.sha256 for s in a["val"].shards] == [s.sha256 for s in b["val"].shards]  # byte-identical
    assert [s.sha256 for s in a["train"].shards] == [s.sha256 for s in b["train"].shards]
    val_a, val_c = set(read_back(tmp_path / "a" / "val")), set(read_back(tmp_path / "c" / "val"))
    assert len(val_a) == len(val_c) == 50 and val_a != val_c
    assert not val_a & set(read_back(tmp_path / "a" / "train"))
    assert "test" not in a.splits


def test_fashion_mnist_class_names_from_folder_name(tmp_path, digits):
    src = tmp_path / "fashion-mnist"
    src.mkdir()
    write_idx(src / "train-images-idx3-ubyte.gz", digits["train"][0])
    write_idx(src / "train-labels-idx1-ubyte.gz", digits["train"][1])
    built = build_shards(src, tmp_path / "out", format="idx", progress=False)
    assert built.classes[0] == "T-shirt/top" and built.classes[9] == "Ankle boot"


# ------------------------------------------------------------------------------------- imagefolder


def test_imagefolder_round_trip_keeps_files_as_they_came(tmp_path, digits):
    images, labels = digits["test"]
    root = tmp_path / "folder"
    originals = {}
    for split, sl in (("train", slice(0, 90)), ("test", slice(90, 120))):
        for i in range(len(images))[sl]:
            cls = f"class_{labels[i]}"
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            fmt, ext = ("JPEG", ".jpeg") if i % 3 == 0 else ("PNG", ".png")
            path = root / split / cls / f"img{i:03d}{ext}"
            Image.fromarray(images[i]).convert("RGB").save(path, format=fmt)
            originals[path] = path.read_bytes()
    (root / "train" / "class_0" / "notes.txt").write_text("not an image")  # ignored by extension
    built = build_shards(root, tmp_path / "out", format="imagefolder", val_fraction=0.25, progress=False)
    assert built.classes == tuple(f"class_{d}" for d in range(10))
    assert built.num_samples == {"train": 68, "val": 22, "test": 30}
    # Expected: the sorted file list per split (the index in the key), files stored byte for byte.
    stored = {}
    for split in ("train", "val", "test"):
        for key, (pixels, label, data, ext) in read_back(tmp_path / "out" / split).items():
            stored[key] = (label, data, ext)
    for split in ("train", "test"):
        files = sorted(p for p in originals if p.parts[-3] == split)
        for i, path in enumerate(files):
            label, data, ext = stored.pop(f"{split}-{i:08d}")
            assert data == originals[path] and label == int(path.parent.name.split("_")[1])
            assert ext == ("jpg" if path.suffix == ".jpeg" else "png")
    assert not stored
    assert built["train"].image.formats.keys() == {"jpg", "png"}


def test_imagefolder_flat_class_tree(tmp_path, digits):
    images, labels = digits["test"]
    for i in range(40):
        (tmp_path / "flat" / f"c{labels[i]}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(tmp_path / "flat" / f"c{labels[i]}" / f"{i}.png")
    built = build_shards(tmp_path / "flat", tmp_path / "out", format="imagefolder", progress=False)
    assert set(built.splits) == {"train", "val"} and sum(built.num_samples.values()) == 40


# ----------------------------------------------------------------------------------------- parquet


def png_bytes(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_parquet_round_trip_binary_and_hf_struct_columns(tmp_path, digits):
    src = tmp_path / "pq"
    (src / "data").mkdir(parents=True)
    for split, (images, labels) in digits.items():
        encoded = [png_bytes(img) for img in images]
        if split == "train":  # Hugging Face layout: struct<bytes, path> and ClassLabel names in the metadata
            column = pa.array([{"bytes": b, "path": None} for b in encoded],
                              pa.struct([("bytes", pa.binary()), ("path", pa.string())]))  # fmt: skip
        else:
            column = pa.array(encoded, pa.binary())
        table = pa.table({"img": column, "digit": pa.array(labels, pa.int64())})
        names = [f"digit {i}" for i in range(10)]
        features = {"info": {"features": {"digit": {"_type": "ClassLabel", "names": names}}}}
        table = table.replace_schema_metadata({"huggingface": json.dumps(features)})
        pq.write_table(table, src / "data" / f"{split}-00000-of-00001.parquet", row_group_size=77)
    built = build_shards(src, tmp_path / "out", format="parquet", image_column="img", label_column="digit",
                         samples_per_shard=100, progress=False)  # fmt: skip
    assert built.classes[3] == "digit 3"
    assert_round_trip(tmp_path / "out", digits, carved_val=True)


def test_parquet_string_labels_single_file(tmp_path, digits):
    images, labels = digits["test"]
    names = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
    table = pa.table({"image": [png_bytes(i) for i in images], "label": names[labels].tolist()})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=50)
    built = build_shards(tmp_path / "t.parquet", tmp_path / "out", format="parquet", val_fraction=0, progress=False)
    assert built.classes == tuple(sorted(names))
    back = read_back(tmp_path / "out" / "train")
    for key, (pixels, label, _, _) in back.items():
        i = index(key)[1]
        assert np.array_equal(pixels, images[i]) and built.classes[label] == names[labels[i]]
    assert len(back) == len(images)


def test_parquet_bad_inputs(tmp_path, digits):
    table = pa.table({"image": [png_bytes(digits["test"][0][0])], "label": [0]})
    pq.write_table(table, tmp_path / "t.parquet")
    with pytest.raises(SourceError, match="no column 'picture'"):
        build_shards(tmp_path / "t.parquet", tmp_path / "o", format="parquet", image_column="picture")
    pq.write_table(pa.table({"image": [b"not an image"], "label": [0]}), tmp_path / "bad.parquet")
    with pytest.raises(SourceError, match="bad.parquet row 0: not an image"):
        build_shards(tmp_path / "bad.parquet", tmp_path / "o2", format="parquet", val_fraction=0, progress=False)


# ------------------------------------------------------------------------------------------- CIFAR


def cifar_batch(images: np.ndarray, labels, label_key: str) -> bytes:
    """A batch in the CIFAR python format (bytes keys, as the originals were pickled under Python 2)."""
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # R plane, G plane, B plane
    return pickle.dumps({b"batch_label": b"x", label_key.encode(): list(map(int, labels)), b"data": rows}, protocol=2)


@pytest.fixture(scope="module")
def cifar_like():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (70, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 70)
    return images, labels


@pytest.mark.parametrize("packed", [False, True])
def test_cifar10_round_trip_folder_and_tar_gz(tmp_path, cifar_like, packed):
    images, labels = cifar_like
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(cifar_batch(images[:30], labels[:30], "labels"))
    (folder / "data_batch_2").write_bytes(cifar_batch(images[30:50], labels[30:50], "labels"))
    (folder / "test_batch").write_bytes(cifar_batch(images[50:], labels[50:], "labels"))
    names = [f"name{i}".encode() for i in range(10)]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    source = folder
    if packed:
        source = tmp_path / "cifar-10-python.tar.gz"
        with tarfile.open(source, "w:gz") as tar:
            tar.add(folder, arcname=folder.name)
    built = build_shards(source, tmp_path / "out", format="cifar", val_fraction=0.2, progress=False)
    assert built.classes == tuple(f"name{i}" for i in range(10))
    assert built["train"].image_mode == "RGB" and built["train"].image_size == (32, 32)
    splits = {"train": (images[:50], labels[:50]), "test": (images[50:], labels[50:])}
    assert_round_trip(tmp_path / "out", splits, carved_val=True)


def test_cifar100_fine_labels(tmp_path, cifar_like):
    images, labels = cifar_like
    (tmp_path / "c100").mkdir()
    (tmp_path / "c100" / "train").write_bytes(cifar_batch(images[:60], labels[:60] * 10, "fine_labels"))
    (tmp_path / "c100" / "test").write_bytes(cifar_batch(images[60:], labels[60:] * 10, "fine_labels"))
    meta = {b"fine_label_names": [f"f{i}".encode() for i in range(100)], b"coarse_label_names": []}
    (tmp_path / "c100" / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    built = build_shards(tmp_path / "c100", tmp_path / "out", format="cifar", val_fraction=0, progress=False)
    assert built.num_classes == 100
    assert_round_trip(tmp_path / "out", {"train": (images[:60], labels[:60] * 10),
                                         "test": (images[60:], labels[60:] * 10)}, carved_val=False)  # fmt: skip


def test_cifar_refuses_pickles_that_are_not_cifar_batches(tmp_path):
    (tmp_path / "evil").mkdir()

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    (tmp_path / "evil" / "batches.meta").write_bytes(pickle.dumps(Payload()))
    (tmp_path / "evil" / "data_batch_1").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(SourceError, match="builtins.print, which a CIFAR batch never does"):
        build_shards(tmp_path / "evil", tmp_path / "out", format="cifar")


# ---------------------------------------------------------------------------------- verify / inspect


def test_verify_clean_then_names_corrupt_sample_truncated_shard_and_missing_shard(tmp_path):
    root = make_digits_shards(tmp_path / "d", samples_per_shard=UNEVEN_SHARDS)
    report = verify_shards(root, progress=False)
    assert report.ok and report.samples == 1797 and report.shards == 18

    key = corrupt_sample(root / "train" / "train-000003.tar")
    truncate_shard(root / "test" / "test-000001.tar")
    (root / "val" / "val-000001.tar").unlink()
    report = verify_shards(root, progress=False)
    text = str(report)
    assert not report.ok
    assert f"train/train-000003.tar: sample '{key}':" in text  # the corrupt image, by key
    assert "train/train-000003.tar: contents differ from the manifest" in text
    assert "test/test-000001.tar: contents differ from the manifest" in text
    assert "test/test-000001.tar: holds 102 samples, the manifest says 203" in text  # truncated
    assert re.search(r"test-000001.tar: sample 'test-\d{8}' is incomplete", text)
    assert "val/val-000001.tar: shard file is missing" in text
    assert not any("train-000000" in str(p) for p in report.problems)

    manifest = json.loads((root / "train" / "manifest.json").read_text())
    manifest["shards"][1]["offsets"][2] += 512  # would send a seeking reader to the wrong place
    (root / "train" / "manifest.json").write_text(json.dumps(manifest))
    assert "train/train-000001.tar: sample byte offsets differ" in str(verify_shards(root, progress=False))


def test_cli_build_inspect_verify(tmp_path, digits, capsys):
    src = tmp_path / "src"
    src.mkdir()
    write_idx(src / "train-images-idx3-ubyte", digits["train"][0])
    write_idx(src / "train-labels-idx1-ubyte", digits["train"][1])
    out = tmp_path / "out"
    argv = ["shards", "build", str(src), str(out), "--format", "idx", "--samples-per-shard", "128",
            "--val-fraction", "0.1", "--seed", "1", "--class-names", ",".join("abcdefghij"), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "train" in printed and "450" in printed and "classes (10): a, b, c" in printed
    assert main(argv) == 2  # refuses to overwrite...
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0  # ...unless asked
    capsys.readouterr()

    assert main(["shards", "inspect", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["split", "shards", "samples", "classes", "mode", "size", "(HxW)", "MiB"]
    assert table[1].split()[:6] == ["train", "4", "450", "10", "L", "8x8"]
    assert table[2].split()[:3] == ["val", "1", "50"]

    assert main(["shards", "verify", str(out), "--no-progress"]) == 0
    assert "OK" in capsys.readouterr().out
    key = corrupt_sample(out / "val" / "val-000000.tar")
    assert main(["shards", "verify", str(out), "--no-progress"]) == 1
    assert f"val/val-000000.tar: sample '{key}'" in capsys.readouterr().out

    assert main(["shards", "inspect", str(tmp_path / "nothing")]) == 2
    assert "no manifest.json" in capsys.readouterr().err


# -------------------------------------------------------------------------------------- bad inputs


def test_bad_sources_give_clear_errors(tmp_path, digits):
    with pytest.raises(SourceError, match="not a directory"):
        build_shards(tmp_path / "missing", tmp_path / "o", format="idx")
    (tmp_path / "pngs" / "a").mkdir(parents=True)
    Image.fromarray(digits["test"][0][0]).save(tmp_path / "pngs" / "a" / "0.png")
    with pytest.raises(SourceError, match="no train-images-idx3-ubyte"):
        build_shards(tmp_path / "pngs", tmp_path / "o", format="idx")
    with pytest.raises(SourceError, match="unknown format 'tfrecord'"):
        build_shards(tmp_path / "pngs", tmp_path / "o", format="tfrecord")
    (tmp_path / "pngs" / "a" / "broken.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(SourceError, match="broken.png: not an image PIL can read"):
        build_shards(tmp_path / "pngs", tmp_path / "o", format="imagefolder", val_fraction=0, progress=False)
    src = tmp_path / "short"
    src.mkdir()
    write_idx(src / "train-images-idx3-ubyte", digits["train"][0])
    (src / "train-labels-idx1-ubyte").write_bytes(
        bytes([0, 0, 8, 1]) + (500).to_bytes(4, "big") + bytes(100)  # says 500 labels, holds 100
    )
    with pytest.raises(SourceError, match="truncated"):
        build_shards(src, tmp_path / "o", format="idx")
    write_idx(src / "train-labels-idx1-ubyte", digits["train"][1])
    with pytest.raises(ValueError, match="val fraction must be in"):
        build_shards(src, tmp_path / "o", format="idx", val_fraction=1.5)
    with pytest.raises(SourceError, match="labels go up to 9 but only 3 class names"):
        build_shards(src, tmp_path / "o", format="idx", class_names=["a", "b", "c"])
    with pytest.raises(ManifestError):
        read_manifest(tmp_path / "o")
