"""benchmarks/bench_gpu on a machine without a GPU: the smoke run's tables and JSON, and the no-CUDA exit.

The smoke run is the GPU benchmark's own code path on the CPU with shrunk models (batch 2, 2 rounds): every
group eager, and the compiled variants (aot_eager) of the Castling and DVT groups, whose compiles take
seconds; the 224 group's four Swin-sized compiles would take half a minute more and share the code path.
Its figures mean nothing; what is checked is that every row is there, measured and finite.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import bench_gpu

pytestmark = pytest.mark.timeout(180)

ROWS = {
    "224": {"swin_tiny_patch4_window7_224", "hier_msa_swin_t", "vit_lsla_swin_t", "vit_lsla_tiny"},
    "castling": {"castling_deit_tiny/224", "deit_tiny_patch16_224/224", "castling_deit_small/224",
                 "deit_small_patch16_224/224"},
    "dvt": {"dvt_t2t_vit_12", "t2t_vit_12"},
}  # fmt: skip
TRAINED = {"224": ROWS["224"], "castling": ROWS["castling"], "dvt": set()}  # rows with a training step in smoke


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def check_rows(groups: list[dict], compiled_modes: set[bool]) -> None:
    for group in groups:
        rows = group["entries"]
        assert {r["name"] for r in rows} == ROWS[group["group"]]
        expected = {(name, compiled) for name in ROWS[group["group"]] for compiled in compiled_modes}
        assert {(r["name"], r["compiled"]) for r in rows} == expected
        for r in rows:
            assert r["error"] is None
            assert finite(r["gmacs"]) and r["gmacs"] > 0 and finite(r["mac_ratio"]), r["name"]
            kinds = ("train", "infer") if r["name"] in TRAINED[group["group"]] else ("infer",)
            assert [kind for kind in ("train", "infer") if r[kind] is not None] == list(kinds), r["name"]
            for kind in kinds:
                k = r[kind]
                assert finite(k["images_per_s"]) and k["images_per_s"] > 0 and finite(k["tflops"]), (r["name"], kind)
                assert k["mfu"] is None  # no peak for a CPU
                assert len(k["seconds_per_image"]) == 2  # two rounds
                if r["is_reference"]:
                    assert k["ratio"] is None
                else:
                    assert finite(k["ratio"]) and all(map(finite, k["ratio_iqr"])), (r["name"], kind)
                if r["compiled"]:
                    assert finite(k["compile_speedup"]), (r["name"], kind)
        for r in rows:
            if r["name"] == "dvt_t2t_vit_12":
                assert sum(r["exit_split"]) == r["batch"]["infer"]
                assert len(r["thresholds"]) == 2 and r["q"] == 0.5


def test_smoke_every_group_eager(tmp_path, capsys):
    out = tmp_path / "bench_gpu.json"
    result = bench_gpu.main(["--smoke", "--no-compile", "--json", str(out)])
    printed = capsys.readouterr().out
    assert [g["group"] for g in result["groups"]] == ["224", "castling", "dvt"]
    check_rows(result["groups"], {False})
    data = json.loads(out.read_text())  # strict JSON: an unreached exit's threshold is the string "inf"
    assert data["settings"]["smoke"] and data["settings"]["compile_backend"] is None
    check_rows(data["groups"], {False})
    assert len(data["targets"]) == len(bench_gpu.TARGETS)
    assert {t["verdict"] for t in data["targets"]} <= {"met", "MISS", "n/a"}
    assert all(t["verdict"] == "n/a" for t in data["targets"] if "MFU" in t["target"])  # no peak for a CPU
    titles = ("224x224, 102 classes", "Castling (inference form)", "DVT(T2T-ViT-12) early exit", "targets (issue 17)")
    assert all(title in printed for title in titles)
    assert "exit split" in printed and "dense bf16 peaks" in printed


def test_smoke_compiled_castling_and_dvt(capsys):
    result = bench_gpu.main(["--smoke", "--only", "castling", "dvt"])
    assert [g["group"] for g in result["groups"]] == ["castling", "dvt"]
    check_rows(result["groups"], {False, True})
    assert "compile" in capsys.readouterr().out


def test_without_cuda_says_so_and_exits_0(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_gpu.main([]) is None
    assert "no CUDA device is available" in capsys.readouterr().out


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989),
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100-PCIE-40GB", 312), ("NVIDIA A10G", 125), ("NVIDIA A10", 125),
    ("NVIDIA L40S", 362), ("NVIDIA L40", 181), ("NVIDIA L4", 121), ("NVIDIA GeForce RTX 4090", 165),
    ("Tesla T4", None),
])  # fmt: skip
def test_peak_lookup_by_device_name(name, peak):
    match = bench_gpu.peak_bf16_tflops(name)
    assert (match[1] if match else None) == peak
