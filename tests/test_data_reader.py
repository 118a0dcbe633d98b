"""The training reader: balanced partitions over uneven shards, per-epoch reshuffle, exact eval, bad data."""

from __future__ import annotations

import http.server
import io
import itertools
import json
import shutil
import threading
from collections import Counter
from functools import partial

import numpy as np
import pytest
import torch
from torchvision import transforms as T

from pipeline.data import (
    CorruptSampleError,
    ManifestMismatchError,
    ShardError,
    build_loader,
    build_transform,
    plan_epoch,
    read_manifest,
)
from pipeline.data.manifest import ManifestError
from tests.datasets import (
    UNEVEN_SHARDS,
    corrupt_sample,
    digits_arrays,
    index_of,
    make_digits_shards,
    make_indexed_shards,
)

NUM_INDEXED = 602  # over the six UNEVEN_SHARDS sizes (602 = their sum)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    return make_indexed_shards(tmp_path_factory.mktemp("indexed"), NUM_INDEXED)


def read_indices(loader) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Per batch: the indices its real rows spell, and its labels."""
    batches, labels = [], []
    for images, y in loader:
        batches.append([index_of(img) for img, label in zip(images, y) if label >= 0])
        labels.append(y)
    return batches, labels


# ------------------------------------------------------------------------------------------ the plan


def covered(plans, sizes) -> list[tuple[int, int]]:
    """(shard, position) pairs the plans read, from the segments (checked against the sizes)."""
    pairs = []
    for plan in plans:
        for seg in plan.segments:
            assert 0 <= seg.start < seg.stop <= sizes[seg.shard]
            pairs += [(seg.shard, p) for p in range(seg.start, seg.stop)]
    return pairs


@pytest.mark.parametrize("world_size,batch_size,num_workers", [(1, 7, 1), (2, 8, 3), (3, 16, 2), (4, 5, 4)])
def test_train_plan_balanced_disjoint_bounded_drop(world_size, batch_size, num_workers):
    sizes = [97, 250, 13, 180, 61, 1, 40]
    total = sum(sizes)
    for epoch in range(3):
        ranks = [plan_epoch(sizes, batch_size=batch_size, rank=r, world_size=world_size, num_workers=num_workers,
                            epoch=epoch, seed=5, train=True) for r in range(world_size)]  # fmt: skip
        batches = [sum(p.num_batches for p in plans) for plans in ranks]
        assert len(set(batches)) == 1 and batches[0] == total // (world_size * batch_size)
        for plans in ranks:  # train: every worker's batches are all real samples
            assert all(p.num_real == p.num_batches * batch_size for p in plans)
        read = list(itertools.chain.from_iterable(covered(plans, sizes) for plans in ranks))
        assert len(read) == len(set(read)), "a sample is read twice in one epoch"
        assert 0 <= total - len(read) < world_size * batch_size


@pytest.mark.parametrize("world_size,batch_size,num_workers", [(1, 7, 2), (3, 16, 2), (4, 100, 3), (8, 4, 1)])
def test_eval_plan_reads_every_sample_once_in_order(world_size, batch_size, num_workers):
    sizes = [97, 250, 13, 180, 61, 1, 40]
    ranks = [plan_epoch(sizes, batch_size=batch_size, rank=r, world_size=world_size, num_workers=num_workers,
                        train=False) for r in range(world_size)]  # fmt: skip
    assert len({sum(p.num_batches for p in plans) for plans in ranks}) == 1
    read = list(itertools.chain.from_iterable(covered(plans, sizes) for plans in ranks))
    assert read == [(s, p) for s in range(len(sizes)) for p in range(sizes[s])]  # all, once, manifest order


def test_plan_reshuffles_per_epoch_deterministically():
    sizes = [50] * 12
    plan = partial(plan_epoch, sizes, batch_size=10, rank=0, world_size=3, num_workers=1, seed=1, train=True)
    shards = [tuple(s.shard for s in plan(epoch=e)[0].segments) for e in range(4)]
    assert shards[0] == tuple(s.shard for s in plan(epoch=0)[0].segments)  # deterministic
    assert len(set(shards)) == 4  # and different every epoch


def test_plan_too_small_for_a_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="no full batch per rank"):
        plan_epoch([5, 5], batch_size=8, world_size=2, train=True)


# ------------------------------------------------------------------------------- the loader, end to end


def test_ranks_get_equal_batches_no_duplicates_bounded_drop(indexed):
    world_size, batch_size = 3, 16
    seen, lengths = [], []
    for rank in range(world_size):
        loader = build_loader(indexed, batch_size=batch_size, rank=rank, world_size=world_size, epoch=2, seed=7,
                              num_workers=2 if rank == 0 else 0, shuffle_buffer=64)  # fmt: skip
        batches, labels = read_indices(loader)
        lengths.append((len(loader), len(batches)))
        assert all(len(b) == batch_size for b in batches)
        for b, y in zip(batches, labels):  # labels travel with their images
            assert y.tolist() == [i % 5 for i in b]
        seen += itertools.chain.from_iterable(batches)
    assert len({n for pair in lengths for n in pair}) == 1 and lengths[0][0] == NUM_INDEXED // (3 * 16)
    assert len(seen) == len(set(seen))
    assert set(seen) <= set(range(NUM_INDEXED))
    assert NUM_INDEXED - len(seen) < world_size * batch_size


def test_epochs_reshuffle_and_repeat_exactly(indexed):
    def rank0_indices(epoch):
        loader = build_loader(indexed, batch_size=10, world_size=2, epoch=epoch, seed=3, num_workers=0)
        return list(itertools.chain.from_iterable(read_indices(loader)[0]))

    first = rank0_indices(0)
    assert rank0_indices(0) == first
    second = rank0_indices(1)
    assert second != first and set(second) != set(first)  # other samples for this rank, not just reordered

    loader = build_loader(indexed, batch_size=10, world_size=2, epoch=0, seed=3, num_workers=0)
    loader.set_epoch(1)
    assert list(itertools.chain.from_iterable(read_indices(loader)[0])) == second


@pytest.mark.parametrize("num_workers", [0, 2, 3])
def test_a_resumed_epoch_continues_its_plan_at_the_next_batch(indexed, num_workers):
    """set_start(k): the same batches as the uninterrupted epoch from batch k on, in order, whatever the number
    of loader workers (the DataLoader takes batches from them in turn); set_epoch starts the next one whole."""
    loader = build_loader(indexed, batch_size=8, rank=1, world_size=2, epoch=4, seed=7, num_workers=num_workers)
    whole = read_indices(loader)[0]
    for k in (1, 4, 5, len(whole) - 1, len(whole)):
        loader.set_start(k)
        assert len(loader) == len(whole) and loader.start_batch == k
        assert read_indices(loader)[0] == whole[k:], k
    loader.set_epoch(5)
    assert loader.start_batch == 0 and len(read_indices(loader)[0]) == len(whole)
    with pytest.raises(ValueError, match="outside this epoch's"):
        loader.set_start(len(whole) + 1)


def test_eval_covers_every_sample_once_with_label_minus_one_padding(indexed):
    world_size, batch_size = 4, 32  # 602 samples: ranks of 151/151/150/150, 5 batches each
    seen, lengths, pads = [], set(), 0
    for rank in range(world_size):
        loader = build_loader(indexed, batch_size=batch_size, rank=rank, world_size=world_size, train=False,
                              num_workers=2 if rank == 3 else 0)  # fmt: skip
        batches, labels = read_indices(loader)
        lengths |= {len(loader), len(batches)}
        assert all(len(y) == batch_size for y in labels)
        pads += sum(int((y == -1).sum()) for y in labels)
        seen += itertools.chain.from_iterable(batches)
    assert lengths == {5}
    assert sorted(seen) == list(range(NUM_INDEXED))
    assert pads == world_size * 5 * batch_size - NUM_INDEXED


def test_eval_order_is_the_manifest_order(indexed):
    loader = build_loader(indexed, batch_size=50, train=False, num_workers=0)
    order = list(itertools.chain.from_iterable(read_indices(loader)[0]))
    manifest = read_manifest(indexed)
    keys = []
    for shard in manifest.shard_urls():
        import tarfile

        with tarfile.open(shard) as tar:
            keys += [int(m.name.split("-")[1].split(".")[0]) for m in tar.getmembers() if m.name.endswith(".cls")]
    assert order == keys


def test_pixels_and_labels_read_back_equal_the_source(tmp_path):
    root = make_digits_shards(tmp_path / "digits", samples_per_shard=UNEVEN_SHARDS, image_size=16)
    images, labels = digits_arrays(16)
    expected = Counter((img.tobytes(), int(label)) for img, label in zip(images, labels))
    got = Counter()
    for split in ("train", "val", "test"):
        for x, y in build_loader(root / split, batch_size=64, train=False, num_workers=0):
            for img, label in zip(x, y):
                if label >= 0:
                    got[((img[0] * 255).round().to(torch.uint8).numpy().tobytes(), int(label))] += 1
    assert got == expected


def test_build_transform_grey_to_rgb_and_one_channel(tmp_path):
    root = make_digits_shards(tmp_path / "digits", image_size=8)
    rgb = build_transform(16, train=False, in_chans=3)
    grey = build_transform(16, train=False, in_chans=1)
    x3, y3 = next(iter(build_loader(root / "test", batch_size=8, train=False, transform=rgb, num_workers=0)))
    x1, y1 = next(iter(build_loader(root / "test", batch_size=8, train=False, transform=grey, num_workers=0)))
    assert x3.shape == (8, 3, 16, 16) and x1.shape == (8, 1, 16, 16)
    assert torch.equal(y3, y1)
    # Independent reference: torchvision's own resize / centre-crop / normalise on the same images.
    images, _ = digits_arrays(8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    raw = next(iter(build_loader(root / "test", batch_size=8, train=False, num_workers=0)))[0]
    ref = T.Compose([T.Resize(18, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(16), T.Normalize(mean, std)])
    expected = ref(raw.expand(-1, 3, -1, -1))
    assert torch.allclose(x3, expected, atol=0.02)
    denormalised = x3 * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    assert torch.allclose(denormalised[:, 0], denormalised[:, 1], atol=1e-5)  # grey replicated to RGB
    assert torch.allclose(x1[:, 0] * 0.226 + 0.449, denormalised[:, 0], atol=1e-4)


def test_train_transform_random_augmentation_shapes(tmp_path):
    root = make_digits_shards(tmp_path / "digits")
    tf = build_transform(24, train=True, in_chans=3, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25)
    loader = build_loader(root / "train", batch_size=32, transform=tf, num_workers=2)
    batches = list(loader)
    assert len(batches) == len(loader) and all(x.shape == (32, 3, 24, 24) for x, _ in batches)
    assert all(x.dtype == torch.float32 and y.dtype == torch.int64 for x, y in batches)
    with pytest.raises(ValueError, match="in_chans"):
        build_transform(24, train=True, in_chans=2)


def test_no_colour_jitter_means_no_jitter_step():
    def steps(transform):
        return [type(t).__name__ for t in transform.transforms[1].transforms]

    assert "ColorJitter" in steps(build_transform(32, train=True, in_chans=1, color_jitter=0.4))
    assert "ColorJitter" not in steps(build_transform(32, train=True, in_chans=1, color_jitter=0.0))


def test_uint8_transform_then_normalize_on_device_equals_the_normalised_transform(tmp_path):
    """The training loader's form (uint8 out of the workers, normalised where the batch is) gives the same
    tensors as timm's normalised transform, train (same random draws) and eval, RGB and greyscale."""
    import random

    from pipeline.data import NormalizeOnDevice

    root = make_digits_shards(tmp_path / "digits", image_size=8)
    manifest = read_manifest(root / "train")
    for train, in_chans in [(True, 3), (True, 1), (False, 3)]:
        batches = {}
        for normalize in (True, False):
            tf = build_transform(16, train=train, in_chans=in_chans, auto_augment="rand-m9-mstd0.5-inc1" if train else None,
                                 normalize=normalize)  # fmt: skip
            random.seed(0), np.random.seed(0), torch.manual_seed(0)  # timm's crops, RandAugment's ops, jitter
            batches[normalize] = next(iter(build_loader(manifest, batch_size=16, train=train, transform=tf, num_workers=0)))[0]
        assert batches[False].dtype == torch.uint8 and batches[True].dtype == torch.float32
        assert torch.allclose(NormalizeOnDevice(in_chans)(batches[False]), batches[True], atol=1e-5), (train, in_chans)
    with pytest.raises(TypeError, match="uint8"):
        NormalizeOnDevice(3)(batches[True])


def test_normalize_on_device_random_erasing():
    """re_prob: that share of the images gets one zero rectangle (timm's const mode) of 2-33% of its area."""
    import random

    from pipeline.data import NormalizeOnDevice

    random.seed(0)
    pixels = torch.full((400, 3, 20, 20), 200, dtype=torch.uint8)  # normalised, nothing is exactly 0
    erased = (NormalizeOnDevice(3, re_prob=0.25)(pixels) == 0).all(dim=1)
    share = erased.flatten(1).float().mean(1)
    assert 0.18 < (share > 0).float().mean() < 0.32
    assert share[share > 0].min() >= 0.015 and share.max() <= 0.36  # 2-33%, sides rounded to whole pixels
    assert not (NormalizeOnDevice(3)(pixels) == 0).any()


def test_randaugment_top_magnitude_posterize_does_not_crash():
    from PIL import Image

    from pipeline.data.transforms import posterize

    image = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).convert("RGB")
    assert np.array(posterize(image, 0)).max() == 0  # 0 bits kept: black, as TF's RandAugment does
    assert np.array_equal(np.array(posterize(image, 2)), np.array(image) & 0b11000000)
    # m10 with increasing posterize asks for 0 bits whenever posterize is drawn (Pillow 12+ raises on it).
    tf = build_transform(16, train=True, auto_augment="rand-m10-n15-mstd0-inc1")
    for _ in range(20):
        assert tf(image).shape == (3, 16, 16)


# ---------------------------------------------------------------------------------------- URL schemes


def indices(loader) -> list[int]:
    return list(itertools.chain.from_iterable(read_indices(loader)[0]))


def test_local_reads_seek_with_the_manifest_offsets(indexed):
    import tarfile

    manifest = read_manifest(indexed)
    for entry, url in zip(manifest.shards, manifest.shard_urls()):
        with tarfile.open(url) as tar:
            firsts = [m.offset for m in tar.getmembers() if m.name.endswith(".cls")]  # .cls sorts first
        assert entry.offsets == tuple(firsts[::64])
    # Seeking (local path) and streaming from the start (pipe:) read the very same samples.
    plans = [p for r in range(3) for p in plan_epoch([s.num_samples for s in manifest.shards], batch_size=8,
                                                     rank=r, world_size=3, num_workers=2, seed=4)]  # fmt: skip
    assert any(seg.start >= 64 for p in plans for seg in p.segments)  # the seek path is taken
    for rank in range(3):
        kw = dict(batch_size=8, rank=rank, world_size=3, seed=4, num_workers=2)
        assert indices(build_loader(indexed, **kw)) == indices(build_loader(f"pipe:cat {indexed}/{{name}}", **kw))


def test_file_and_pipe_urls_and_an_explicit_url_list(indexed):
    local = indices(build_loader(indexed, batch_size=20, seed=1, num_workers=0))
    assert indices(build_loader(f"file://{indexed}", batch_size=20, seed=1, num_workers=0)) == local
    assert indices(build_loader(f"pipe:cat {indexed}/{{name}}", batch_size=20, seed=1, num_workers=0)) == local
    manifest = read_manifest(indexed)
    urls = [f"pipe:cat {indexed}/{s.name}" for s in reversed(manifest.shards)]  # order does not matter
    loader = build_loader(urls, manifest=indexed / "manifest.json", batch_size=20, seed=1, num_workers=0)
    assert indices(loader) == local
    with pytest.raises(ManifestError, match="needs its manifest"):
        build_loader(urls, batch_size=20)
    with pytest.raises(ManifestError, match="no URL given"):
        build_loader(urls[1:], manifest=manifest, batch_size=20)


def test_http_urls(indexed):
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(indexed.parent))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/train"
        assert read_manifest(url).num_samples == NUM_INDEXED
        remote = indices(build_loader(url, batch_size=20, seed=1, num_workers=2))
    finally:
        server.shutdown()
    assert remote == indices(build_loader(indexed, batch_size=20, seed=1, num_workers=2))


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """A static file server that honours ``Range: bytes=N-`` (as object stores do) and counts bytes sent."""

    sent: Counter = Counter()

    def log_message(self, *args, **kwargs):
        pass

    def send_head(self):
        start = self.headers.get("Range", "bytes=0-").removeprefix("bytes=").split("-")[0]
        path = self.translate_path(self.path)
        if not start.isdigit() or not path.endswith(".tar"):
            return super().send_head()
        data = open(path, "rb").read()[int(start) :]
        self.send_response(206 if int(start) else 200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.sent[self.path] += len(data)
        return io.BytesIO(data)


def test_https_ranges_start_each_worker_at_its_range(indexed):
    """Loader workers whose range starts deep in a shard ask for the bytes from there, not from byte 0."""
    handler = partial(_RangeHandler, directory=str(indexed.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _RangeHandler.sent.clear()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/train"
        kw = dict(batch_size=8, rank=2, world_size=3, seed=4, num_workers=2)
        assert indices(build_loader(url, **kw)) == indices(build_loader(indexed, **kw))
    finally:
        server.shutdown()
    manifest = read_manifest(indexed)
    plans = plan_epoch([s.num_samples for s in manifest.shards], batch_size=8, rank=2, world_size=3, num_workers=2,
                       seed=4)  # fmt: skip
    read_from_zero = sum(manifest.shards[seg.shard].num_bytes for plan in plans for seg in plan.segments)
    assert any(seg.start >= 64 for plan in plans for seg in plan.segments)  # some range starts past an offset
    assert sum(_RangeHandler.sent.values()) < read_from_zero


FLAKY_PIPE = """#!{python}
# Streams a shard, but the first time for each shard only its first half, then fails (a broken download).
import sys
from pathlib import Path

marks, path = Path(sys.argv[1]), Path(sys.argv[2])
data = path.read_bytes()
mark = marks / (path.name + ".failed")
if path.suffix == ".tar" and not mark.exists():
    mark.write_text("")
    sys.stdout.buffer.write(data[: len(data) // 2])
    sys.exit(1)
sys.stdout.buffer.write(data)
"""


def test_a_pipe_that_breaks_mid_shard_is_reopened_and_reads_the_same_samples(indexed, tmp_path, capfd, monkeypatch):
    """Every shard's first `pipe:` read stops half-way with exit status 1: each is re-opened at the next
    sample, and the epoch reads exactly what a clean read does."""
    import sys

    import pipeline.data.reader as reader

    monkeypatch.setattr(reader.time, "sleep", lambda seconds: None)  # the backoff, not what is tested
    script = tmp_path / "flaky.py"
    script.write_text(FLAKY_PIPE.format(python=sys.executable))
    script.chmod(0o755)
    kw = dict(batch_size=20, seed=1, num_workers=0)
    flaky = indices(build_loader(f"pipe:{script} {tmp_path} {indexed}/{{name}}", **kw))
    assert flaky == indices(build_loader(indexed, **kw))
    assert len(list(tmp_path.glob("*.failed"))) == len(read_manifest(indexed).shards)  # each one broke once
    assert "re-opening at sample" in capfd.readouterr().out


def test_a_remote_shard_that_keeps_failing_is_a_shard_error_after_the_retries(indexed, monkeypatch, capfd):
    import pipeline.data.reader as reader

    monkeypatch.setattr(reader.time, "sleep", lambda seconds: None)
    urls = [f"pipe:head -c 5000 {indexed}/{s.name}; exit 1" for s in read_manifest(indexed).shards]
    loader = build_loader(urls, manifest=indexed / "manifest.json", batch_size=20, seed=1, num_workers=0)
    with pytest.raises(ShardError, match="unreadable .* the command exited with status 1"):
        indices(loader)
    assert capfd.readouterr().out.count("re-opening at sample") == reader.REMOTE_RETRIES


# ----------------------------------------------------------------------------------------- bad data


@pytest.fixture
def digits_copy(tmp_path):
    return make_digits_shards(tmp_path / "digits", samples_per_shard=100)


def test_missing_shard_names_it(digits_copy):
    victim = digits_copy / "test" / "test-000001.tar"
    victim.unlink()
    with pytest.raises(ShardError, match="test-000001.tar"):
        build_loader(digits_copy / "test", batch_size=10)
    with pytest.raises(ShardError, match=r"test-000001.tar: unreadable before its first sample.*(status|exit) 1"):
        list(build_loader(f"pipe:cat {digits_copy}/test/{{name}}", batch_size=10, train=False, num_workers=0))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_corrupt_image_names_shard_and_key_or_is_skipped(digits_copy, num_workers):
    shard = digits_copy / "test" / "test-000002.tar"
    key = corrupt_sample(shard)
    loader = build_loader(digits_copy / "test", batch_size=10, train=False, num_workers=num_workers)
    with pytest.raises(CorruptSampleError, match=rf"test-000002.tar: sample '{key}'"):
        list(loader)
    loader = build_loader(digits_copy / "test", batch_size=10, train=False, num_workers=num_workers, skip_corrupt=True)
    batches = list(loader)
    assert len(batches) == len(loader) == 30 and loader.skipped == 1
    assert sum(int((y == -1).sum()) for _, y in batches) == 1


@pytest.mark.parametrize("cut", ["in a member's data", "in a member's header"])
def test_truncated_shard_names_the_shard(digits_copy, cut):
    import tarfile

    shard = digits_copy / "test" / "test-000000.tar"
    with tarfile.open(shard) as tar:
        member = tar.getmembers()[41]
    size = member.offset_data + member.size // 2 if cut == "in a member's data" else member.offset + 100
    with open(shard, "r+b") as f:
        f.truncate(size)
    message = r"test-000000.tar: (unreadable after sample 'test-\d{8}'|sample 'test-\d{8}' is incomplete)"
    with pytest.raises(ShardError, match=message):
        list(build_loader(digits_copy / "test", batch_size=10, train=False, num_workers=0, skip_corrupt=True))


def test_manifest_disagreeing_with_shards_names_the_shard(digits_copy):
    split = digits_copy / "test"  # 300 samples: shards of 100, 100, 100
    original = json.loads((split / "manifest.json").read_text())

    def claim(shard1_delta):  # move samples between shards 1 and 2 in the manifest (totals stay consistent)
        manifest = json.loads(json.dumps(original))
        manifest["shards"][1]["num_samples"] += shard1_delta
        manifest["shards"][2]["num_samples"] -= shard1_delta
        (split / "manifest.json").write_text(json.dumps(manifest))

    claim(+5)
    with pytest.raises(ManifestMismatchError, match="test-000001.tar: ended after 100 samples"):
        list(build_loader(split, batch_size=10, train=False, num_workers=0))
    claim(-5)
    with pytest.raises(ManifestMismatchError, match="test-000001.tar: holds more than the 95 samples"):
        list(build_loader(split, batch_size=10, train=False, num_workers=0))


def test_source_errors_are_clear(tmp_path, digits_copy):
    with pytest.raises(ManifestError, match="no manifest.json"):
        build_loader(tmp_path / "nowhere", batch_size=4)
    with pytest.raises(ManifestError, match="dataset root with splits"):
        build_loader(digits_copy, batch_size=4)
    with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
        build_loader(digits_copy / "test", batch_size=4, rank=2, world_size=2)
    (digits_copy / "val" / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="val/manifest.json: not a valid shard manifest"):
        read_manifest(digits_copy / "val")


def test_read_manifest_describes_the_dataset(digits_copy):
    info = read_manifest(digits_copy)
    assert info.num_samples == {"train": 1347, "val": 150, "test": 300}
    assert info.classes == tuple(str(i) for i in range(10)) and info.num_classes == 10
    assert info.image_size == (8, 8) and info.image_mode == "L" and info.channels == 1
    train = read_manifest(digits_copy / "train")
    assert train.num_samples == 1347 and len(train.shards) == 14
    assert sum(train.class_counts) == 1347 and train.image.formats == {"png": 1347}


def test_split_locations_resolve_to_shard_urls():
    from pipeline.data.manifest import location_template, shard_url

    assert shard_url(location_template("gs://bucket/fmnist/train/"), "train-000000.tar") == (
        "gs://bucket/fmnist/train/train-000000.tar"
    )
    assert shard_url(location_template("https://host/d/val"), "manifest.json") == "https://host/d/val/manifest.json"
    s3 = "pipe:aws s3 cp s3://bucket/fmnist/test/{name} -"
    assert shard_url(location_template(s3), "test-000003.tar") == "pipe:aws s3 cp s3://bucket/fmnist/test/test-000003.tar -"
    assert shard_url(location_template("/data/{x}/train"), "a.tar") == "/data/{x}/train/a.tar"  # braces in paths


# ------------------------------------------------------------------------------------- the tar reader


def webdataset_samples(url: str) -> list[dict]:
    """What webdataset's own tar iterators read from a shard (the reference the fast reader must equal)."""
    from webdataset import tariterators
    from webdataset.gopen import gopen

    files = tariterators.tar_file_expander([{"url": url, "stream": gopen(url, "rb")}], eof_value={})
    return list(tariterators.group_by_keys(files))


def test_tar_reader_reads_what_webdataset_reads(tmp_path, indexed):
    from pipeline.data.tar import read_shard

    root = make_digits_shards(tmp_path / "digits", samples_per_shard=UNEVEN_SHARDS, rgb=True)
    urls = read_manifest(root / "train").shard_urls() + read_manifest(indexed).shard_urls()
    for url in urls:
        expected = webdataset_samples(url)
        assert expected and list(read_shard(url)) == expected  # keys, extensions, bytes, __url__
        assert list(read_shard(f"pipe:cat {url}")) == [{**s, "__url__": f"pipe:cat {url}"} for s in expected]
    # From a manifest offset: the samples from there on.
    entry, url = read_manifest(indexed).shards[1], read_manifest(indexed).shard_urls()[1]
    assert len(entry.offsets) > 1
    assert list(read_shard(url, entry.offsets[1])) == webdataset_samples(url)[64:]


def write_tar(path, members, format=None) -> None:
    """A tar of (name, bytes) members, written by Python's tarfile (PAX by default, as webdataset's TarWriter)."""
    import io
    import tarfile

    kwargs = {} if format is None else {"format": format}
    with tarfile.open(path, "w", **kwargs) as tar:
        for name, data in members:
            if data is None:
                info = tarfile.TarInfo(name)
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("fmt", ["pax", "gnu", "ustar"])
def test_tar_reader_long_names_directories_and_compression(tmp_path, fmt):
    import bz2
    import gzip
    import lzma
    import tarfile

    from pipeline.data.tar import iter_samples

    def read(path):  # the grouping alone: read_shard also insists on a label and an image per sample
        with open(path, "rb") as f:
            return list(iter_samples(f, str(path)))

    deep = "/".join(["d" * 30] * 4) + "/sub"  # over ustar's 100-byte name field: pax / GNU long name / prefix
    members = [
        ("data", None),
        (f"{deep}/k1.cls", b"1"),
        (f"{deep}/k1.PNG", b"\x89PNG" + bytes(700)),  # extensions lower-cased, as webdataset does
        ("__meta__", b"skipped"),
        ("a.b/k2.seg.cls", b"22"),  # key: up to the first dot of the last component; the rest is the extension
        ("a.b/k2.jpg", b"jpeg bytes" * 100),
        ("ünïcode-k3.cls", b"3"),
        ("ünïcode-k3.png", b""),
    ]
    if fmt == "ustar":
        members = [(n, d) for n, d in members if n.isascii()]
    path = tmp_path / "shard.tar"
    write_tar(path, members, {"pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT, "ustar": tarfile.USTAR_FORMAT}[fmt])
    expected = webdataset_samples(str(path))
    assert [s["__key__"] for s in expected][:2] == [f"{deep}/k1", "a.b/k2"]
    assert "png" in expected[0] and "seg.cls" in expected[1]
    assert read(path) == expected
    raw = path.read_bytes()
    for suffix, compress in (("gz", gzip.compress), ("bz2", bz2.compress), ("xz", lzma.compress)):
        packed = tmp_path / f"shard.tar.{suffix}"
        packed.write_bytes(compress(raw))
        assert read(packed) == [{**s, "__url__": str(packed)} for s in expected]


def test_tar_reader_truncation_and_damage_name_the_shard(digits_copy):
    import tarfile

    from pipeline.data.tar import read_shard

    shard = digits_copy / "test" / "test-000000.tar"
    original = shard.read_bytes()
    with tarfile.open(shard) as tar:
        member = tar.getmembers()[41]  # sample 20's second member

    def read_after(damage) -> list:
        shard.write_bytes(damage(original))
        got = []
        with pytest.raises(ShardError) as info:
            for sample in read_shard(str(shard)):
                got.append(sample["__key__"])
        assert str(shard) in str(info.value)
        return got, str(info.value)

    keys, message = read_after(lambda b: b[: member.offset_data + member.size // 2])  # cut in a member's data
    assert len(keys) == 20 and f"after sample '{keys[-1]}'" in message and "truncated" in message
    keys, message = read_after(lambda b: b[: member.offset + 100])  # cut in a member's header
    assert len(keys) == 20 and "inside a member header" in message
    keys, message = read_after(lambda b: b[: member.offset])  # cut between members: sample 20 is half there
    assert len(keys) == 20 and "without the end-of-archive block at byte" in message
    end = len(original.rstrip(b"\0")) // 512 * 512 + 512  # all members, without the end-of-archive blocks
    keys, message = read_after(lambda b: b[:end])  # the last sample might have had more members: not yielded
    assert len(keys) == 99 and "without the end-of-archive block" in message
    flipped = bytearray(original)
    flipped[member.offset + 130] ^= 0x01  # a bit of the size field
    keys, message = read_after(lambda b: bytes(flipped))
    assert len(keys) == 20 and f"checksum at byte {member.offset}" in message
    keys, message = read_after(lambda b: b"not a tar" * 100)
    assert keys == [] and "before its first sample" in message and "checksum" in message
