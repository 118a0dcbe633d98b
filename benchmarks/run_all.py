"""Run every benchmark, one after another, and write ``BENCHMARKS.md``: one summary table, then each
benchmark's own printed tables and how it measures.

    python -m benchmarks.run_all                 # about an hour on 2 idle cores (make bench)
    python -m benchmarks.run_all --quick         # smaller sizes, ~15 min: checks that everything runs
    python -m benchmarks.run_all --only counts dvt --out /tmp/report.md

Each benchmark runs in its own process (``python -m benchmarks.bench_<name> ... --json``): its printed
output is kept verbatim, its JSON feeds the summary. Ratios are always measured side by side within one
benchmark run, never across runs. A benchmark that fails is reported as failed, with its output, and the
others still run. Run it on an otherwise idle machine: the load average before and after each benchmark is
recorded in the report.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Benchmark:
    key: str  # names the summary function and the JSON file
    module: str  # benchmarks.bench_<module>
    title: str
    args: tuple[str, ...] = ()  # the full run
    quick_args: tuple[str, ...] = ()  # a smoke run


BENCHMARKS = [
    Benchmark("counts", "counts", "Parameters and MACs against the papers"),
    Benchmark("lsla", "lsla", "ViT-LSLA against Swin-T and its msa twin (CPU throughput)", (), ("--quick",)),
    Benchmark("castling", "castling", "Castling-ViT against DeiT: cost against tokens, training and inference", (),
              ("--sizes", "tiny", "--tokens", "196", "784", "--repeats", "2")),
    Benchmark("dvt", "dvt", "DVT: accuracy against MACs, early-exit throughput", (),
              ("--epochs", "1", "--train-images", "6000", "--timed-images", "2000")),
    # 5 timed epochs: with 3, the best epoch still moved by ~5% between runs on an idle machine
    Benchmark("data", "data", "Data reader against ImageFolder and the in-memory ceiling, 32x32", ("--rounds", "5"),
              ("--images", "3000")),
    Benchmark("data224", "data", "Data reader against ImageFolder and the in-memory ceiling, 224x224",
              ("--img-size", "224", "--images", "4000", "--rounds", "5"), ("--img-size", "224", "--images", "1000")),
    Benchmark("train", "train", "Ray Train against torchrun", (), ("--images", "4096", "--rounds", "1")),
    Benchmark("loader224", "train", "The training loader alone at 224x224 JPEG (bench_train --gpu --loader-only)",
              ("--gpu", "--loader-only", "--images", "8192", "--loader-workers", "2"),
              ("--gpu", "--loader-only", "--images", "1024", "--loader-workers", "2")),
    Benchmark("accuracy", "accuracy", "Accuracy on Fashion-MNIST at equal training budget", (),
              ("--train-images", "3000", "--epochs", "1")),
]


# ---- the machine ----

def machine() -> dict:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))  # fmt: skip
        mem_gib = kb / 2**20
    except (OSError, StopIteration):
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return dict(cpu=cpu, cores=len(os.sched_getaffinity(0)), mem_gib=mem_gib, gpu=gpu, os=platform.platform(),
                python=platform.python_version(), torch=torch.__version__)  # fmt: skip


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()  # fmt: skip
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "") if out.returncode == 0 else "?"
    except OSError:
        return "?"


# ---- running ----

def run(bench: Benchmark, quick: bool, scratch: Path) -> dict:
    json_path = scratch / f"{bench.key}.json"
    cmd = [sys.executable, "-m", f"benchmarks.bench_{bench.module}", *(bench.quick_args if quick else bench.args),
           "--json", str(json_path)]  # fmt: skip
    print(f"\n=== {bench.title}: {' '.join(cmd[1:])}", flush=True)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    lines = []
    with subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:  # echo as it comes, keep it for the report
            print(line, end="", flush=True)
            lines.append(line)
    data = json.loads(json_path.read_text()) if proc.returncode == 0 and json_path.exists() else None
    return dict(key=bench.key, module=bench.module, title=bench.title, command="python " + " ".join(cmd[1:-2]), returncode=proc.returncode,
                seconds=time.perf_counter() - start, load=(load_before, os.getloadavg()[0]), data=data,
                output=_printed_tables(lines))  # fmt: skip


PROGRESS_BAR = re.compile(r"\d+/\d+ \[[\d:<?]")  # tqdm's "123/8000 [00:01<..." (its \r became newlines)
LOG_NOISE = ("INFO", "WARNING", "(pid=", "(RayTrainWorker", "(TrainController", "View detailed results",
             "Creating initial MLflow", "Updating database", "Started a local Ray", "Token authentication")  # fmt: skip


def _printed_tables(lines: list[str]) -> str:
    """The benchmark's own output, minus progress bars and library log noise."""
    kept = [line for line in lines if not any(n in line for n in LOG_NOISE) and not PROGRESS_BAR.search(line)]
    return re.sub(r"\n{3,}", "\n\n", "".join(kept)).strip()


# ---- the summary: (area, figure, measured, target or paper, verdict) rows ----

def verdict(ok: bool | None) -> str:
    return "" if ok is None else ("met" if ok else "**missed**")


def summarise_counts(d: dict) -> list[tuple]:
    rows = []
    for m in d["models"]:
        if m["paper_params_m"] is None and m["paper_gmacs"] is None:
            continue
        ours = f"{m['params_m']:.2f}M params, {m['gmacs']:.3f} GMACs"
        paper = ", ".join(f for f in (m["paper_params_m"] and f"{m['paper_params_m']}M params",
                                       m["paper_gmacs"] and f"{m['paper_gmacs']} GMACs") if f)  # fmt: skip
        off = [abs(o / p - 1) for o, p in ((m["params_m"], m["paper_params_m"]), (m["gmacs"], m["paper_gmacs"])) if p]
        rows.append(("counts", f"{m['model']} params / MACs", ours, f"{paper} ({m['source']})",
                      f"within {100 * max(off):.1f}%"))  # fmt: skip
    return rows


def summarise_lsla(d: dict) -> list[tuple]:
    """LSLA models against the group's reference (timm's Swin-T) and against their msa twin, where the
    group has one; msa models against Swin-T are reported (the target is LSLA's). Ratios are bench_lsla's:
    medians of per-round ratios, with their interquartile range."""
    rows = []
    for group in d["groups"]:
        if group["group"] == "attention":  # the per-module breakdown stays in its own section
            continue
        size = f"{group['img_size']}x{group['img_size']}"
        for e in group["entries"]:
            if e["reference"]:
                continue
            lsla = "lsla" in e["name"]
            comparisons = [(f"over {group['reference']}", e)]
            if e.get("twin"):
                comparisons.append((f"over its msa twin {e['twin']['name']}", e["twin"]))
            for kind in ("train", "infer"):
                for against, c in comparisons:
                    low, high = c[f"{kind}_ratio_iqr"]
                    rows.append(("LSLA", f"{e['name']} {kind} images/s {against}, {size}",
                                 f"{c[f'{kind}_ratio']:.3f}x (IQR {low:.2f}-{high:.2f}; MACs {c['mac_advantage']:.2f}x)",
                                 f">= {c['target_ratio']:.3f}x ({c['target_ratio'] / c['mac_advantage']:.2f} x MAC ratio)" if lsla else "reported",
                                 verdict(c[f"{kind}_ok"]) if lsla else ""))  # fmt: skip
    return rows


def summarise_castling(d: dict) -> list[tuple]:
    rows = []
    for r in d["tokens"]:
        rows.append(("Castling", f"{r['size']} at {r['tokens']} tokens: speed-up over softmax (CPU time)",
                     f"{r['speedup']:.2f}x (MACs {r['mac_ratio']:.2f}x)", f">= {0.9 * r['mac_ratio']:.2f}x",
                     verdict(r["speedup"] >= 0.9 * r["mac_ratio"])))  # fmt: skip
    growth = max(r["growth"] for r in d["tokens"])
    rows.append(("Castling", "time per token, largest growth from the fewest tokens", f"{growth:.2f}x", "<= 1.3x",
                 verdict(growth <= 1.3)))  # fmt: skip
    for r in d["train_infer_224"]:
        if r["model"] != "castling":
            rows.append(("Castling", f"{r['size']} at 224: Castling's speed-up over {r['model']} ({r['name']})",
                         f"train {r['castling_train_speedup']:.2f}x, inference {r['castling_infer_speedup']:.2f}x",
                         "reported", ""))  # fmt: skip
    return rows


def summarise_dvt(d: dict) -> list[tuple]:
    rows = []
    for c in d["comparisons"]:
        rows.append(("DVT", f"equal accuracy to {c['reference']} ({c['reference_top1']:.2f}%)",
                     f"{c['measured_top1']:.2f}% at {c['mac_ratio']:.2f}x fewer MACs, {c['speedup']:.2f}x img/s",
                     ">= 1.7x fewer MACs within 0.2 points, >= 1.4x throughput",
                     verdict(c["reached"] and c["mac_ratio"] >= 1.7 and c["speedup"] >= 1.4)))  # fmt: skip
    return rows


def summarise_data(d: dict) -> list[tuple]:
    size, shards = f"{d['img_size']}x{d['img_size']}", d["readers"]["shards"]
    return [
        ("data", f"shards / in-memory ceiling, {size} ({d['workers']} workers)",
         f"{shards['vs_in_memory']:.2f}x images/s ({shards['cpu_vs_in_memory']:.2f}x in CPU per image)", ">= 0.90x",
         verdict(shards["vs_in_memory"] >= 0.9)),
        ("data", f"shards / torchvision ImageFolder, {size}",
         f"{d['shards_vs_imagefolder']:.2f}x images/s ({d['shards_vs_imagefolder_cpu']:.2f}x in CPU per image)",
         "> 1x", verdict(d["shards_vs_imagefolder"] > 1.0)),
        ("data", f"shard build, {size} source images", f"{d['shard_build_images_per_s']:.0f} images/s", "reported", ""),
    ]  # fmt: skip


summarise_data224 = summarise_data


def summarise_train(d: dict) -> list[tuple]:
    return [("training", f"Ray Train ({d['workers']} workers) step time over torchrun DDP",
             f"{100 * d['overhead']:+.1f}% (CPU per step {100 * d['cpu_overhead']:+.1f}%)", "<= +10%",
             verdict(d["target_met"]))]  # fmt: skip


def summarise_loader224(d: dict) -> list[tuple]:
    uint8, classic = d["loader"]["forms"]["uint8 (the loop's)"], d["loader"]["forms"]["float32, normalised in the workers"]
    return [("data", f"train loader at 224x224 JPEG ({d['loader_workers']} workers): uint8 form over float form",
             f"{uint8['images_per_s'] / classic['images_per_s']:.2f}x images/s "
             f"({classic['cpu_ms_per_image'] / uint8['cpu_ms_per_image']:.2f}x in CPU per image)", "reported", ""),
            ("data", "train loader at 224x224 JPEG: images/s per loader CPU (uint8 form)",
             f"{1000 / uint8['cpu_ms_per_image']:.0f}", "reported", "")]  # fmt: skip


def summarise_accuracy(d: dict) -> list[tuple]:
    return [("accuracy", f"{r['model']} test top-1 ({d['train_images']:,} images x {d['epochs']} epochs)",
             f"{r['test_top1']:.2f}%", "reported", "") for r in d["rows"]]  # fmt: skip


SUMMARISE = {b.key: globals()[f"summarise_{b.key}"] for b in BENCHMARKS}


def report(results: list[dict], info: dict, quick: bool, started: str, commit: str) -> str:
    gpu = f"; GPU: {info['gpu']}" if info["gpu"] else "; no GPU (all figures are CPU)"
    lines = [
        "# Benchmarks",
        "",
        f"Written by `python -m benchmarks.run_all{' --quick' if quick else ''}` (`make bench`) on {started}, "
        f"commit {commit}.",
        "",
        f"**Machine:** {info['cpu']}, {info['cores']} cores, "
        + (f"{info['mem_gib']:.0f} GiB memory" if info["mem_gib"] else "memory unknown")
        + f"{gpu}; {info['os']}; Python {info['python']}, torch {info['torch']}.",
        "",
        "Every ratio below was measured side by side in one run of one benchmark (interleaved rounds, so load",
        "from elsewhere hits both sides alike). Sections after the table show each benchmark's own output and",
        "say how it measures. `reported` rows have no target: they are there to be read.",
        "",
        "## Summary",
        "",
        "| area | figure | measured | target / paper | verdict |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        if r["data"] is None:
            lines.append(f"| {r['key']} | {r['title']} | failed (exit {r['returncode']}), see below | | **failed** |")
            continue
        try:
            rows = SUMMARISE[r["key"]](r["data"])
        except (KeyError, TypeError, ValueError) as err:  # a benchmark's JSON changed shape: say so, keep going
            rows = [(r["key"], r["title"], f"summary unavailable ({type(err).__name__}: {err})", "", "")]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    explained = set()
    for r in results:
        doc = _docstring(r["module"]) if r["module"] not in explained else "Measured as in the section above."
        explained.add(r["module"])
        lines += [
            "",
            f"## {r['title']}",
            "",
            f"`{r['command']}`: {r['seconds'] / 60:.1f} min, load average {r['load'][0]:.1f} before, "
            f"{r['load'][1]:.1f} after.",
            "",
            doc,
            "",
            "```text",
            r["output"],
            "```",
        ]
    return "\n".join(lines) + "\n"


def _docstring(module: str) -> str:
    """The benchmark's module docstring, minus its usage lines: how it measures."""
    import ast

    source = (REPO / "benchmarks" / f"bench_{module}.py").read_text()
    doc = ast.get_docstring(ast.parse(source)) or ""
    kept = [line for line in doc.splitlines() if not line.lstrip().startswith("python -m")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: checks that everything runs")
    parser.add_argument("--only", nargs="+", choices=[b.key for b in BENCHMARKS], help="run only these")
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    info, commit = machine(), git_commit()  # the code measured: before anything can change under the run
    chosen = [b for b in BENCHMARKS if not args.only or b.key in args.only]
    with tempfile.TemporaryDirectory(prefix="vitpipe-bench-") as scratch:
        results = [run(b, args.quick, Path(scratch)) for b in chosen]
    args.out.write_text(report(results, info, args.quick, started, commit))
    failed = [r["key"] for r in results if r["data"] is None]
    print(f"\nwrote {args.out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
