"""The training loop without Ray workers: loss, evaluation, accumulation, stopping rules, checkpoints, and
whole in-process runs (Ray Train's local mode) for the methods that train differently (Castling, DVT)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import mlflow
import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from torch import nn

from pipeline import tracking
from pipeline.train.build import classification_loss
from pipeline.train.checkpoint import (
    checkpoint_dir_name,
    delete_run_dir,
    latest_checkpoint,
    load_checkpoint,
    load_model,
    save_checkpoint,
    strip_wrapper_prefixes,
)
from pipeline.train.config import ConfigError, TrainConfig
from pipeline.train.launcher import NonFiniteLossError, _resume_point, train
from pipeline.train.loop import (
    Dist,
    State,
    _memory_format,
    _optimizer,
    _scheduler,
    _setup,
    _train_loss,
    evaluate,
    train_one_epoch,
)

pytestmark = pytest.mark.timeout(180)
CPU = Dist(rank=0, world_size=1, device=torch.device("cpu"))


def plain_config(**sections) -> TrainConfig:
    data = {"train": "unused", "val": "unused", "num_classes": 5, "img_size": 4, "in_chans": 1, "batch_size": 4}
    base = {"model": {"name": "vit_msa_nano"}, "data": data, "precision": "fp32", "log_every": 2,
            "optim": {"epochs": 1, "label_smoothing": 0.0}}  # fmt: skip
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return TrainConfig.from_dict(base)


class ListLoader:
    """The reader's interface (len, iteration, skipped, set_epoch) over fixed batches."""

    def __init__(self, batches):
        self.batches, self.skipped = batches, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)

    def set_epoch(self, epoch):
        pass


def linear_state(config: TrainConfig, model: nn.Module, *, lr: float = 0.1) -> State:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    state = State(model=model, ddp=model, optimizer=optimizer, scheduler=None,
                  scaler=torch.amp.GradScaler("cpu", enabled=False), ema=None)  # fmt: skip
    state.scheduler = _scheduler(config, optimizer, updates_per_epoch=100)
    return state


# ------------------------------------------------------------------------------------------ loss and evaluation


def test_classification_loss_single_and_per_exit():
    torch.manual_seed(0)
    logits, target = torch.randn(6, 5), torch.randint(0, 5, (6,))
    assert torch.allclose(classification_loss(logits, target, label_smoothing=0.1),
                          F.cross_entropy(logits, target, label_smoothing=0.1))  # fmt: skip
    exits = [torch.randn(6, 5) for _ in range(3)]
    expected = 0.5 * F.cross_entropy(exits[0], target) + 1.0 * F.cross_entropy(exits[1], target) + 2.0 * F.cross_entropy(exits[2], target)
    assert torch.allclose(classification_loss(exits, target, exit_weights=[0.5, 1.0, 2.0]), expected)
    soft = torch.softmax(torch.randn(6, 5), dim=-1)  # mixup targets carry their own smoothing
    assert torch.allclose(classification_loss(logits, soft, label_smoothing=0.3), F.cross_entropy(logits, soft))
    with pytest.raises(ConfigError, match="method.dvt.exit_weights"):
        classification_loss(logits, target, exit_weights=[1.0])


def test_skipped_corrupt_rows_add_nothing_to_the_loss():
    torch.manual_seed(3)
    config = plain_config(data={"skip_corrupt": True})
    logits = torch.randn(6, 5, requires_grad=True)
    labels = torch.tensor([1, -1, 3, 0, -1, 4])
    valid = labels != -1
    loss = _train_loss(logits, labels.clamp(min=0), valid, config)
    assert torch.allclose(loss, F.cross_entropy(logits[valid], labels[valid]))
    exits = [torch.randn(6, 5) for _ in range(2)]
    assert torch.allclose(_train_loss(exits, labels.clamp(min=0), valid, config),
                          sum(F.cross_entropy(e[valid], labels[valid]) for e in exits))  # fmt: skip
    nothing = _train_loss(logits, torch.zeros(6, dtype=torch.long), torch.zeros(6, dtype=torch.bool), config)
    nothing.backward()
    assert nothing.item() == 0.0 and torch.count_nonzero(logits.grad) == 0


class LookupModel(nn.Module):
    """Returns fixed logits chosen by the index stored in each image's first pixel (one tensor, or per exit)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table)  # (exits, N, C)

    def forward(self, images):
        rows = self.table[:, images[:, 0, 0, 0].long()]
        return list(rows) if len(self.table) > 1 else rows[0]


@pytest.mark.parametrize("exits", [1, 3])
def test_evaluate_is_exact_and_ignores_padding_rows(exits):
    torch.manual_seed(1)
    n, classes = 10, 7
    table = torch.randn(exits, n, classes)
    labels = torch.randint(0, classes, (n,))
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 4, 4)
    # 3 batches of 4: the last holds 2 padding rows (label -1), as the reader pads short eval ranks.
    padded_labels = torch.cat([labels, torch.tensor([-1, -1])])
    padded_images = torch.cat([images, torch.zeros(2, 1, 4, 4)])
    batches = [(padded_images[i : i + 4], padded_labels[i : i + 4]) for i in range(0, 12, 4)]
    config = plain_config(data={"num_classes": classes})

    metrics = evaluate(LookupModel(table), ListLoader(batches), CPU, config)

    final = table[-1]
    assert metrics["loss"] == pytest.approx(F.cross_entropy(final, labels).item(), rel=1e-6)
    assert metrics["top1"] == pytest.approx(100 * (final.argmax(-1) == labels).float().mean().item())
    top5 = (final.topk(5, dim=-1).indices == labels[:, None]).any(-1).float().mean().item()
    assert metrics["top5"] == pytest.approx(100 * top5)
    if exits > 1:
        for k in range(exits):
            assert metrics[f"exit{k + 1}_top1"] == pytest.approx(100 * (table[k].argmax(-1) == labels).float().mean().item())
    else:
        assert not any(key.startswith("exit") for key in metrics)


# ------------------------------------------------------------------------------------------ the train step


def test_gradient_accumulation_equals_one_big_batch():
    torch.manual_seed(2)
    images, labels = torch.randn(8, 1, 4, 4), torch.randint(0, 5, (8,))
    initial = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
    results = []
    for accum, batches in [(1, [(images, labels)]), (2, [(images[:4], labels[:4]), (images[4:], labels[4:])])]:
        model = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
        model.load_state_dict(initial.state_dict())
        config = plain_config(optim={"accum_steps": accum, "optimizer": "sgd", "scheduler": "step"})
        state = linear_state(config, model)
        result = train_one_epoch(state, ListLoader(batches), CPU, config, epoch=0, castling=False)
        assert state.global_step == 1 and not result.non_finite
        results.append(model[1].weight.detach().clone())
    assert torch.allclose(results[0], results[1], atol=1e-6)
    assert not torch.allclose(results[0], initial[1].weight)


class Poisoned(nn.Module):
    """A linear classifier whose output turns NaN from the ``bad``-th call on."""

    def __init__(self, bad: int):
        super().__init__()
        self.fc, self.calls, self.bad = nn.Linear(16, 5), 0, bad

    def forward(self, x):
        self.calls += 1
        out = self.fc(x.flatten(1))
        return out * float("nan") if self.calls >= self.bad else out


def test_non_finite_loss_stops_at_the_next_check():
    batches = [(torch.randn(4, 1, 4, 4), torch.randint(0, 5, (4,))) for _ in range(10)]
    config = plain_config(log_every=4, optim={"optimizer": "sgd", "scheduler": "step"})
    state = linear_state(config, Poisoned(bad=6))
    result = train_one_epoch(state, ListLoader(batches), CPU, config, epoch=0, castling=False)
    assert result.non_finite and state.global_step == 8  # NaN at step 6, caught at the check after step 8



def test_the_time_spent_waiting_for_batches_is_measured(monkeypatch):
    """A loader that takes 50 ms per batch: the epoch's data wait is those 4 x 50 ms, not the step's compute."""
    import time

    class SlowLoader(ListLoader):
        def __iter__(self):
            for batch in self.batches:
                time.sleep(0.05)
                yield batch

    batches = [(torch.randn(4, 1, 4, 4), torch.randint(0, 5, (4,))) for _ in range(4)]
    config = plain_config(optim={"optimizer": "sgd", "scheduler": "step"})
    state = linear_state(config, nn.Sequential(nn.Flatten(), nn.Linear(16, 5)))
    result = train_one_epoch(state, SlowLoader(batches), CPU, config, epoch=0, castling=False)
    assert 0.2 <= result.data_wait_s < 0.2 + 0.1 and result.data_wait_s < result.seconds
    fast = train_one_epoch(state, ListLoader(batches), CPU, config, epoch=0, castling=False)
    assert fast.data_wait_s < 0.01

# ------------------------------------------------------------------------------------------ checkpoints


def test_checkpoint_round_trip_without_ray(tmp_path):
    config = plain_config(data={"img_size": 16}, model={"kwargs": {"depth": 1, "embed_dim": 32}},
                          optim={"ema": True, "epochs": 2})  # fmt: skip
    state = _setup(config, CPU)
    state.updates_per_epoch = 3
    state.scheduler = _scheduler(config, state.optimizer, updates_per_epoch=3)
    images, labels = torch.randn(4, 1, 16, 16), torch.randint(0, 5, (4,))
    train_one_epoch(state, ListLoader([(images, labels)] * 3), CPU, config, epoch=0, castling=False)
    state.epochs_done = 1
    run_dir = tmp_path / "run"
    path = save_checkpoint(run_dir / checkpoint_dir_name(1), state.to_dict(config, {"val/top1": 12.5}, "abc123"))

    saved = torch.load(path, weights_only=True)  # plain types and tensors only
    assert saved["epochs_done"] == 1 and saved["global_step"] == 3 and saved["mlflow_run_id"] == "abc123"
    assert json.loads((path.parent / "meta.json").read_text())["metrics"] == {"val/top1": 12.5}

    restored = _setup(config, CPU)
    restored.updates_per_epoch = 3
    restored.scheduler = _scheduler(config, restored.optimizer, updates_per_epoch=3)
    restored.load(load_checkpoint(path.parent), model_name=config.model.name)
    for a, b in zip(state.model.state_dict().values(), restored.model.state_dict().values()):
        assert torch.equal(a, b)
    assert restored.optimizer.param_groups[0]["lr"] == state.optimizer.param_groups[0]["lr"]
    assert restored.global_step == 3
    for a, b in zip(state.ema.module.state_dict().values(), restored.ema.module.state_dict().values()):
        assert torch.equal(a, b)
    # Resumed with another world size (6 steps per epoch): the same place in the schedule.
    rescaled = _setup(config, CPU)
    rescaled.updates_per_epoch = 6
    rescaled.scheduler = _scheduler(config, rescaled.optimizer, updates_per_epoch=6)
    rescaled.load(load_checkpoint(path.parent), model_name=config.model.name)
    assert rescaled.global_step == 6
    lr = state.optimizer.param_groups[0]["lr"]
    assert rescaled.optimizer.param_groups[0]["lr"] == pytest.approx(lr)
    assert config.optim.min_lr < lr < config.optim.lr  # mid-schedule: half way down the cosine

    model = load_model(path.parent).eval()
    state.model.eval()
    with torch.no_grad():
        assert torch.allclose(model(images), state.model(images))

    # The driver's view: the newest complete checkpoint (an interrupted one, without meta.json, is skipped).
    (run_dir / checkpoint_dir_name(2)).mkdir()
    newest, meta = latest_checkpoint(str(run_dir))
    assert Path(newest).name == checkpoint_dir_name(1) and meta["epochs_done"] == 1
    assert delete_run_dir(str(run_dir)) and latest_checkpoint(str(run_dir)) is None


def test_resume_point_new_and_mismatch(tiny_config):
    config = tiny_config()
    state_dir = Path(config.run_dir, checkpoint_dir_name(1))
    save_checkpoint(state_dir, {"epochs_done": 1, "global_step": 21, "metrics": {}, "mlflow_run_id": "r1",
                                "run_name": config.run_name, "config": config.to_dict()})  # fmt: skip
    assert _resume_point(config, new=False)["mlflow_run_id"] == "r1"
    with pytest.raises(ConfigError, match="model: the checkpoints of run 'tiny-cpu' .* pass --new"):
        _resume_point(tiny_config(model__kwargs__depth=3), new=False)
    assert _resume_point(config, new=True) is None and not Path(config.run_dir).exists()


# ------------------------------------------------------------------------------------------ compile and GPU settings


def _trained(config: TrainConfig, batches) -> State:
    state = _setup(config, CPU)
    state.updates_per_epoch = len(batches)
    state.scheduler = _scheduler(config, state.optimizer, updates_per_epoch=len(batches))
    train_one_epoch(state, ListLoader(batches), CPU, config, epoch=0, castling=False)
    state.epochs_done = 1
    return state


def test_compiled_training_matches_eager_and_checkpoints_the_plain_model(tmp_path):
    """aot_eager traces forward and backward through AOTAutograd as inductor does, then runs the graphs eagerly:
    a quick compile, and the numbers of the eager run."""
    from torch._dynamo.utils import counters

    from pipeline.train.build import build_model

    torch.manual_seed(4)
    batches = [(torch.randn(4, 1, 16, 16), torch.randint(0, 5, (4,))) for _ in range(3)]
    sections = dict(data={"img_size": 16}, model={"kwargs": {"depth": 1, "embed_dim": 32}},
                    optim={"ema": True, "epochs": 2})  # fmt: skip
    eager = _trained(plain_config(**sections), batches)
    config = plain_config(**sections, compile=True, compile_backend="aot_eager")
    counters.clear()
    state = _trained(config, batches)
    metrics = evaluate(state.evaluated(), ListLoader(batches), CPU, config)
    ema_metrics = evaluate(state.evaluated(ema=True), ListLoader(batches), CPU, config)

    assert counters["stats"]["unique_graphs"] >= 2  # the training and the evaluation forward were compiled
    assert all(key.startswith("_orig_mod.") for key in state.ddp.state_dict())  # what a checkpoint must not hold
    assert all(key.startswith("_orig_mod.") for key in state.evaluated(ema=True).state_dict())
    initial = build_model(config).state_dict()  # _setup seeds the same initial weights
    assert not torch.equal(state.model.state_dict()["head.weight"], initial["head.weight"])
    for (name, a), b in zip(eager.model.state_dict().items(), state.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name  # the compiled wrapper trained the plain module's parameters
    assert metrics == pytest.approx(evaluate(eager.model, ListLoader(batches), CPU, config), rel=1e-5)
    assert ema_metrics == pytest.approx(evaluate(eager.ema.module, ListLoader(batches), CPU, config), rel=1e-5)

    path = save_checkpoint(tmp_path / checkpoint_dir_name(1), state.to_dict(config, metrics, None))
    saved = torch.load(path, weights_only=True)
    for weights in (saved["model"], saved["ema"]):
        assert weights.keys() == initial.keys()
        build_model(config).load_state_dict(weights, strict=True)
    restored = _setup(config, CPU)  # resuming a compiled run
    restored.updates_per_epoch = 3
    restored.scheduler = _scheduler(config, restored.optimizer, updates_per_epoch=3)
    restored.load(load_checkpoint(path.parent), model_name=config.model.name)
    images = batches[0][0]
    with torch.no_grad():
        assert torch.allclose(restored.evaluated()(images), state.model.eval()(images), atol=1e-6)
        assert torch.allclose(load_model(path.parent)(images), state.model(images), atol=1e-6)


def test_state_dicts_of_compiled_or_ddp_wrapped_models_load(tmp_path):
    config = plain_config(data={"img_size": 16}, model={"kwargs": {"depth": 1, "embed_dim": 32}})
    state = _trained(config, [(torch.randn(4, 1, 16, 16), torch.randint(0, 5, (4,)))])
    plain = state.model.state_dict()

    class Wrapper(nn.Module):  # the names DDP gives: module.<name>
        def __init__(self, module):
            super().__init__()
            self.module = module

    wrapped = {
        "compiled": torch.compile(state.model).state_dict(),  # torch.compile is lazy: nothing compiles here
        "ddp": Wrapper(state.model).state_dict(),
        "compiled ddp": torch.compile(Wrapper(state.model)).state_dict(),
        "ddp of compiled": Wrapper(torch.compile(state.model)).state_dict(),
    }
    assert list(wrapped["compiled ddp"])[0].startswith("_orig_mod.module.")
    for kind, weights in wrapped.items():
        assert weights.keys() != plain.keys(), kind
        assert strip_wrapper_prefixes(weights).keys() == plain.keys(), kind
        saved = state.to_dict(config, {}, None)
        saved["model"] = weights
        path = save_checkpoint(tmp_path / kind.replace(" ", "_"), saved)
        assert load_checkpoint(path)["model"].keys() == plain.keys(), kind
        model = load_model(path)  # strict load_state_dict
        for a, b in zip(model.state_dict().values(), plain.values()):
            assert torch.equal(a, b), kind
        resumed = _setup(config, CPU)
        resumed.scheduler = _scheduler(config, resumed.optimizer, updates_per_epoch=100)
        resumed.load(saved, model_name=config.model.name)  # a dict handed over directly, not read by load_checkpoint
        assert torch.equal(resumed.model.state_dict()["head.weight"], plain["head.weight"]), kind
    # A submodule that happens to be called `module` keeps its name when other keys lack the prefix.
    named = nn.ModuleDict({"module": nn.Linear(2, 2), "head": nn.Linear(2, 2)}).state_dict()
    assert strip_wrapper_prefixes(named) is named


def test_fused_adamw_and_channels_last_only_on_cuda():
    model = nn.Linear(4, 2)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # no GPU needed: fused AdamW also builds on CPU tensors
    assert _optimizer(plain_config(), model, cuda).defaults["fused"] is True
    assert _optimizer(plain_config(optim={"optimizer": "adam"}), model, cuda).defaults["fused"] is True
    assert _optimizer(plain_config(optim={"optimizer": "lookahead_adamw"}), model, cuda).defaults["fused"] is True
    assert not _optimizer(plain_config(), model, cpu).defaults["fused"]
    assert not _optimizer(plain_config(optim={"optimizer": "sgd"}), model, cuda).defaults.get("fused")
    assert not _optimizer(plain_config(optim={"opt_kwargs": {"fused": False}}), model, cuda).defaults["fused"]
    assert not _optimizer(plain_config(optim={"opt_kwargs": {"foreach": True}}), model, cuda).defaults["fused"]

    assert _memory_format(plain_config(channels_last=True), cuda) == torch.channels_last
    assert _memory_format(plain_config(channels_last=True), cpu) == torch.preserve_format
    assert _memory_format(plain_config(), cuda) == torch.preserve_format


ONE_BLOCK = {"depth": 1, "embed_dim": 32, "num_heads": 2}


@pytest.mark.parametrize("name, kwargs", [("vit_msa_nano", ONE_BLOCK), ("vit_lsla_nano", {"depths": [1, 1, 1, 1]}),
                                          ("castling_vit_nano", ONE_BLOCK), ("dvt_vit_nano", ONE_BLOCK)])  # fmt: skip
def test_channels_last_trains_and_evaluates_like_the_default_layout(name, kwargs, monkeypatch):
    """What ``channels_last: true`` does on a GPU, here on CPU: NHWC images and conv weights, same numbers.

    A view of a conv's output would fail on NHWC; the hierarchical models' conv stem is the main user.
    """
    import pipeline.train.loop as loop

    config = plain_config(model={"name": name, "kwargs": kwargs}, data={"img_size": 32, "in_chans": 3},
                          optim={"optimizer": "sgd", "scheduler": "step"})  # fmt: skip
    torch.manual_seed(5)
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,)))]
    runs = {}
    for layout in ("default", "channels_last"):
        if layout == "channels_last":
            monkeypatch.setattr(loop, "_memory_format", lambda config, device: torch.channels_last)
        state = _setup(config, CPU)
        state.scheduler = _scheduler(config, state.optimizer, updates_per_epoch=1)
        seen = []
        state.model.register_forward_pre_hook(
            lambda module, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
        train_one_epoch(state, ListLoader(batches), CPU, config, epoch=0, castling=False)
        metrics = evaluate(state.model, ListLoader(batches), CPU, config)
        runs[layout] = state, seen, metrics
    (dense, dense_seen, dense_metrics), (nhwc, nhwc_seen, nhwc_metrics) = runs["default"], runs["channels_last"]
    assert dense_seen == [False, False] and nhwc_seen == [True, True]  # one training, one evaluation batch
    convs = [p for p in nhwc.model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    for (key, a), b in zip(dense.model.state_dict().items(), nhwc.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), key
    assert nhwc_metrics == pytest.approx(dense_metrics, rel=1e-4, abs=1e-4)


# ------------------------------------------------------------------------------------------ in-process runs


def _run(config):
    client = MlflowClient(config.mlflow.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(config.mlflow.experiment).experiment_id])
    return client, run


def _artifacts(client, run_id, path=None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def test_castling_run_regularises_logs_densities_and_exports_the_inference_form(tiny_config):
    config = tiny_config(model__name="castling_vit_nano", optim__epochs=1, scaling__num_workers=0,
                         method__castling__mask_reg_strength=0.5, data__batch_size=64)  # fmt: skip
    summary = train(config)
    client, run = _run(config)
    assert summary["status"] == "finished" and run.info.status == "FINISHED"
    densities = {k: v for k, v in run.data.metrics.items() if k.startswith("castling/mask_density/")}
    assert len(densities) == 2 and all(0.0 <= v <= 1.0 for v in densities.values())  # the 2 blocks' attention
    assert run.data.metrics["castling/mask_reg_weight"] == 0.5
    assert "castling_mask_density.png" in _artifacts(client, run.info.run_id)

    (logged,) = client.search_logged_models([run.info.experiment_id])
    exported = mlflow.pytorch.load_model(logged.model_uri)
    graph = str(exported.graph)
    assert "softmax" not in graph  # the masked softmax branch is gone: Castling's inference form
    images = torch.randn(3, 1, 16, 16)  # another batch size than the input example's: the batch dim stays free
    assert exported(images).shape == (3, 10)


CASTLING_RUNS = {
    "castling_vit_nano": dict(model__kwargs={"depth": 2, "embed_dim": 64, "num_heads": 4}),
    # 32x32: the first stage's 8x8 map has shifted windows (seams) of 16 tokens
    "castling_swin_nano": dict(model__kwargs={"depths": (2, 2, 1, 1)}, data__img_size=32),
    "dvt_castling_nano": dict(model__kwargs={"depth": 2, "embed_dim": 64, "num_heads": 4}),
}


@pytest.mark.parametrize("name", sorted(CASTLING_RUNS))
def test_castling_training_ends_with_every_mask_empty_and_validates_the_deployed_form(name, tiny_config, tmp_path,
                                                                                      monkeypatch):
    """A real run on the digits with the default regulariser: the branch closes on schedule, the last
    checkpoint's training form equals its inference form, and val/* is the inference form throughout."""
    import pipeline.train.loop as loop
    from pipeline.models.layers.castling import castling_modules, inference_form
    from pipeline.train.build import build_model

    saved = []

    def keep_a_copy(directory, state):  # local mode keeps no checkpoints: take the ones the loop writes
        saved.append(save_checkpoint(tmp_path / "kept" / checkpoint_dir_name(len(saved) + 1), state))
        return save_checkpoint(directory, state)

    monkeypatch.setattr(loop, "save_checkpoint", keep_a_copy)
    config = tiny_config(model__name=name, optim__epochs=3, scaling__num_workers=0, mlflow__log_model=False,
                         **CASTLING_RUNS[name])  # fmt: skip
    assert config.method.castling.mask_reg_strength > 0 and config.method.castling.branch_off_at == 0.75  # defaults
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "masks not empty" warning: they are empty
        warnings.filterwarnings("ignore", category=UserWarning, module="(?!pipeline)")
        summary = train(config)
    client, run = _run(config)
    assert summary["status"] == "finished" and "vitpipe.castling_open_masks" not in run.data.tags
    scales = [m.value for m in client.get_metric_history(run.info.run_id, "castling/branch_scale")]
    assert scales[0] > 0 and scales[-1] == 0.0
    # the training form is reported while it exists, next to the deployed form's val/*
    assert client.get_metric_history(run.info.run_id, "val_train_form/top1")
    assert len(client.get_metric_history(run.info.run_id, "val/top1")) == 3

    model = build_model(config)
    model.load_state_dict(torch.load(saved[-1], weights_only=True)["model"])
    assert all(float(m.gate().detach().abs().max()) == 0.0 for _, m in castling_modules(model))  # every mask empty
    model.eval()
    val_images = next(loop._real_rows(loop._loader(config, CPU, "val", train=False, world=False)))[0]
    size = config.data.img_size
    for images in (val_images, torch.randn(8, 1, size, size)):  # a validation batch, and images unlike any seen
        with torch.no_grad():
            training_form = model(images)
            with inference_form(model):
                deployed = model(images)
        for got, want in zip(*(o if isinstance(o, list) else [o] for o in (deployed, training_form))):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_castling_run_without_the_schedule_warns_and_tags_open_masks(tiny_config):
    config = tiny_config(model__name="castling_vit_nano", optim__epochs=1, scaling__num_workers=0,
                         method__castling__branch_off_at=None, method__castling__mask_reg_strength=0.0,
                         mlflow__log_model=False)  # fmt: skip
    with pytest.warns(UserWarning, match=r"masks not empty after training in 2 layer\(s\)"):
        train(config)
    _, run = _run(config)
    assert "blocks.0.attn" in run.data.tags["vitpipe.castling_open_masks"]
    assert run.data.metrics["val_train_form/top1"] >= 0.0


def test_dvt_run_validates_every_exit_and_logs_the_budget_curve(tiny_config):
    config = tiny_config(model__name="dvt_vit_nano", model__kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2},
                         optim__epochs=1, scaling__num_workers=0, data__batch_size=64,
                         method__dvt__exit_weights=[1.0, 1.0, 2.0], data__test=str(Path(tiny_config().data.train).parent / "test"),
                         mlflow__log_model=False)  # fmt: skip
    train(config)
    client, run = _run(config)
    for k in (1, 2, 3):
        assert 0.0 <= run.data.metrics[f"val/exit{k}_top1"] <= 100.0
    assert run.data.metrics["val/exit3_top1"] == run.data.metrics["val/top1"]  # the last exit answers
    assert int(run.data.params["model.macs_exit1"]) < int(run.data.params["model.macs_exit3"])
    assert {"dvt/dvt_budget.json", "dvt/dvt_budget.png"} <= _artifacts(client, run.info.run_id)
    local = client.download_artifacts(run.info.run_id, "dvt/dvt_budget.json")
    report = json.loads(Path(local).read_text())
    assert report["evaluated_on"] == "test" and report["evaluation_samples"] == 300 and report["points"]
    # the run's own test score (the last exit on all 300 test images) is the budget report's last anytime point
    assert run.data.metrics["test/top1"] == pytest.approx(report["anytime_top1"][-1], abs=1e-6)


def test_non_finite_loss_fails_the_run_with_a_clear_status(tiny_config):
    config = tiny_config(optim__epochs=1, scaling__num_workers=0, optim__optimizer="sgd", optim__lr=1.0e30,
                         log_every=2, mlflow__log_model=False)  # fmt: skip
    with pytest.raises(NonFiniteLossError, match="non_finite_loss: the training loss became nan"):
        train(config)
    _, run = _run(config)
    assert run.info.status == "FAILED" and run.data.tags[tracking.TAG_STATUS].startswith("non_finite_loss")


def test_a_compiled_run_checkpoints_the_plain_model(tiny_config, tmp_path, monkeypatch):
    """The whole loop with compile on: the checkpoint holds the plain model's names, and the run's end loads
    the final weights from the plain EMA module into a fresh model (strictly)."""
    import pipeline.train.loop as loop
    from torch._dynamo.utils import counters

    from pipeline.train.build import build_model

    saved = []

    def keep_a_copy(directory, state):  # local mode keeps no checkpoints: take the one the loop writes
        saved.append(save_checkpoint(tmp_path / "kept" / checkpoint_dir_name(len(saved) + 1), state))
        return save_checkpoint(directory, state)

    monkeypatch.setattr(loop, "save_checkpoint", keep_a_copy)
    config = tiny_config(compile=True, compile_backend="aot_eager", optim__epochs=1, scaling__num_workers=0,
                         optim__ema=True, checkpoint__metric="val_ema/top1", mlflow__log_model=False)  # fmt: skip
    counters.clear()
    summary = train(config)
    _, run = _run(config)
    assert summary["status"] == "finished" and run.info.status == "FINISHED"
    assert counters["stats"]["unique_graphs"] >= 2  # training and evaluation ran compiled
    assert 0.0 <= run.data.metrics["val_ema/top1"] <= 100.0
    (path,) = saved
    state = torch.load(path, weights_only=True)
    for weights in (state["model"], state["ema"]):
        assert not any("_orig_mod" in key for key in weights)
        build_model(config).load_state_dict(weights, strict=True)


def test_a_run_repeats_exactly_under_the_same_seed(tiny_config):
    """Same seed, same losses to the last bit: random crops draw from Python's random (timm), dropout from
    torch's; a changed seed changes them, so the equality is not vacuous."""

    def losses(run_name: str, seed: int) -> list[float]:
        config = tiny_config(run_name=run_name, optim__seed=seed, optim__epochs=1, scaling__num_workers=0,
                             model__kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2, "drop_rate": 0.1},
                             mlflow__log_model=False)  # fmt: skip
        summary = train(config)
        history = MlflowClient(config.mlflow.tracking_uri).get_metric_history(summary["mlflow_run_id"], "train/loss")
        return [m.value for m in sorted(history, key=lambda m: m.step)]

    first = losses("first", seed=0)
    assert losses("again", seed=0) == first
    assert losses("other", seed=1) != first
