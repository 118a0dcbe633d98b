"""Where a training step's time goes: achieved FLOP/s and MFU, every node's system metrics, profiler traces.

The training loop times its own steps (data wait vs compute, per logging window and per epoch); this
module holds what it needs around that:

- ``PEAK_BF16_TFLOPS`` and :func:`peak_bf16_tflops`: a device's dense bf16 peak, for MFU (the GPU benchmark
  prints the same table);
- :class:`NodeSystemMetrics`: MLflow's system-metrics collectors sampled on the first rank of every node, the
  metrics named by node (``system/<node>/cpu_utilization_percentage``, ``system/<node>/gpu_0_utilization_percentage``),
  so that a 4-node run shows 4 nodes' CPUs, GPUs, memory and network, not rank 0's alone;
- :class:`StepProfiler`: ``profile.steps: [start, end]``: a torch.profiler trace of those optimizer steps on
  every rank, logged to the MLflow run as ``profile/rank<r>.trace.json`` (open it in Perfetto or
  chrome://tracing) with ``profile/rank<r>.txt``, the operators' time table.
"""

from __future__ import annotations

import re
import tempfile
import threading
import time
from pathlib import Path

import torch

__all__ = ["PEAK_BF16_TFLOPS", "NodeSystemMetrics", "StepProfiler", "peak_bf16_tflops"]

# Dense (no 2:4 sparsity) bf16 tensor-core peak with float32 accumulation, TFLOP/s: vendor datasheets.
# (pattern searched in torch.cuda.get_device_name(), the part it stands for, peak, note); first match wins.
PEAK_BF16_TFLOPS: tuple[tuple[str, str, float, str], ...] = (
    (r"H100.*PCIe", "H100 PCIe", 756.0, ""),
    (r"H100.*NVL", "H100 NVL", 835.0, ""),
    (r"H100|H800", "H100 SXM", 989.0, ""),
    (r"H200.*NVL", "H200 NVL", 835.0, ""),
    (r"H200", "H200 SXM (GH200 alike)", 989.0, ""),
    (r"B200", "B200", 2250.0, ""),
    (r"A100|A800", "A100", 312.0, ""),
    (r"A10G", "A10G", 125.0, "taken as the A10's; AWS publishes no dense bf16 figure: unverified"),
    (r"\bA10\b", "A10", 125.0, ""),
    (r"L40S", "L40S", 362.0, ""),
    (r"\bL40\b", "L40", 181.0, ""),
    (r"\bL4\b", "L4", 121.0, ""),
    (r"RTX 4090", "GeForce RTX 4090", 165.0, "GeForce: the float32-accumulate rate, half the fp16-accumulate one"),
    (r"RTX 3090", "GeForce RTX 3090", 71.0, "GeForce: the float32-accumulate rate, half the fp16-accumulate one"),
    (r"RTX A6000", "RTX A6000", 155.0, ""),
)

# A training step costs about 3 forwards (the backward about twice the forward) of 2 FLOPs per MAC.
TRAINING_FLOPS_PER_MAC = 2 * 3


def peak_bf16_tflops(device_name: str) -> tuple[str, float, str] | None:
    """(part, dense bf16 TFLOP/s, note) of the first ``PEAK_BF16_TFLOPS`` row whose pattern is in ``device_name``."""
    for pattern, part, peak, note in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return part, peak, note
    return None


class NodeSystemMetrics:
    """This node's CPU, memory, disk, network and GPU use every ``interval_s``, as ``system/<node>/...``;
    a no-op on every rank but a node's first. Use as a context manager around training.

    MLflow's collectors, our own loop: MLflow's stops for good at the first failed read of the run (a busy
    SQLite store, a server restarting) or whenever the run is not RUNNING (a restarted group reopens it),
    and takes ``$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` over the interval it is given. Here each sample is
    sent when taken (a node that dies keeps what it sampled), a failed send goes again with the next one,
    the last is taken on exit (a short run has one too), and a restarted group continues the steps.
    """

    MAX_PENDING = 900  # metrics kept while MLflow is unreachable: one batch (MLflow's limit is 1,000)

    def __init__(self, tracking_uri: str, run_id: str, node: str, *, first_on_node: bool, interval_s: float):
        self.tracking_uri, self.run_id, self.interval_s = tracking_uri, run_id, interval_s
        self.prefix = f"system/{node}/"
        self.collectors: list = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if first_on_node:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # its collectors: CPU and memory, disk, network, and the GPUs NVML (or ROCm) sees
            self.collectors = SystemMetricsMonitor(run_id, tracking_uri=tracking_uri).monitors
            self._thread = threading.Thread(target=self._sample, name="vitpipe-system-metrics", daemon=True)

    def __enter__(self) -> NodeSystemMetrics:
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=30)  # (a send to an unreachable server is not waited for longer)

    def _sample(self) -> None:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        from pipeline.tracking import short_http_retries

        short_http_retries()  # an outage: the next sample tries again, sooner than MLflow's backoff would
        client = MlflowClient(self.tracking_uri)
        key = self.prefix + "cpu_utilization_percentage"
        try:
            step = 1 + max((m.step for m in client.get_metric_history(self.run_id, key)), default=-1)
        except Exception:  # noqa: BLE001 - unreachable: steps from 0; the run's chart shows the restart
            step = 0
        pending: list[Metric] = []
        failing = False
        self._read()  # CPU use is measured since the previous read: this one starts the clock
        while True:
            stopping = self._stop.wait(self.interval_s)
            timestamp = int(time.time() * 1000)
            try:
                pending += [Metric(self.prefix + k, float(v), timestamp, step) for k, v in self._read().items()]
                step += 1
                client.log_batch(self.run_id, metrics=pending[-self.MAX_PENDING:])
                pending, failing = [], False
            except Exception as err:  # noqa: BLE001 - never the run's failure: the next sample tries again
                if not failing:
                    print(f"[vitpipe] system metrics of {self.prefix[7:-1]} not logged ({type(err).__name__}: "
                          f"{str(err)[:200]}); retrying with each sample", flush=True)  # fmt: skip
                pending, failing = pending[-self.MAX_PENDING:], True
            if stopping:
                return

    def _read(self) -> dict[str, float]:
        values: dict[str, float] = {}
        for collector in self.collectors:
            collector.collect_metrics()
            values.update(collector.aggregate_metrics())
            collector.clear_metrics()
        return values


class StepProfiler:
    """A torch.profiler trace of optimizer steps ``start`` to ``end`` (1-based, inclusive) on this rank.

    The loop calls :meth:`before_step` with the number of the step it is about to run (at its first
    micro-batch) and :meth:`after_step` after each optimizer step; the trace is written and logged to the
    MLflow run once step ``end`` is done (or by :meth:`close`, when the run ends first).
    """

    def __init__(self, steps: tuple[int, int], rank: int, device: torch.device, tracking_uri: str | None,
                 run_id: str | None):  # fmt: skip
        self.start, self.end = steps
        self.rank, self.device = rank, device
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.profile: torch.profiler.profile | None = None
        self.first_step = 0
        self.done = False

    def before_step(self, step: int) -> None:
        if self.profile is None and not self.done and self.start <= step <= self.end:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            # a schedule that always records: with one, each step() marks a "ProfilerStep#N" span
            self.profile = torch.profiler.profile(activities=activities, record_shapes=True,
                                                  schedule=lambda _: torch.profiler.ProfilerAction.RECORD)  # fmt: skip
            self.profile.step_num = step  # the spans are named by the run's optimizer step
            self.profile.start()
            self.first_step = step

    def after_step(self, step: int) -> Path | None:
        if self.profile is None:
            return None
        if step >= self.end:
            return self.close()
        self.profile.step()  # closes this step's span, opens the next's
        return None

    def close(self) -> Path | None:
        """Stop and write the trace (if one is running); returns its directory, after logging it to MLflow."""
        if self.profile is None:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.profile.stop()
        out = Path(tempfile.mkdtemp(prefix="vitpipe-profile-"))
        self.profile.export_chrome_trace(str(out / f"rank{self.rank}.trace.json"))
        sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = self.profile.key_averages().table(sort_by=sort, row_limit=40)
        (out / f"rank{self.rank}.txt").write_text(f"optimizer steps {self.first_step}-{self.end} on rank {self.rank}\n"
                                                  f"{table}\n")  # fmt: skip
        self.profile, self.done = None, True
        if self.tracking_uri is not None and self.run_id is not None:
            from mlflow.tracking import MlflowClient

            try:
                MlflowClient(self.tracking_uri).log_artifacts(self.run_id, str(out), "profile")
            except Exception as err:  # noqa: BLE001 - MLflow down: training goes on, the trace stays on disk
                print(f"[vitpipe] rank {self.rank}: profile trace not logged to MLflow ({err}); it is in {out}",
                      flush=True)  # fmt: skip
        return out
