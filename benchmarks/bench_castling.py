"""Castling (inference form) against softmax attention in the same DeiT backbone, on CPU.

For each size and token count the two models run side by side, interleaved, on the same batch; the
table gives MACs (the project's counter), time per image, images/s, time per token, the measured
speed-up and its share of the MAC ratio. Targets (issue 4): speed-up >= 0.9 x MAC ratio at every token
count, and Castling's time per token grows by at most 1.3x from 196 to 3136 tokens.

    python -m benchmarks.bench_castling                # tiny and small, 196 / 784 / 3136 tokens
    python -m benchmarks.bench_castling --sizes tiny --repeats 5
"""

from __future__ import annotations

import argparse
import time

import timm
import torch

import pipeline.models  # noqa: F401  (registers the models)
from pipeline.models.counting import count_macs

PATCH = 16
TOKENS = (196, 784, 3136)


def build(name: str, img_size: int) -> torch.nn.Module:
    return timm.create_model(name, img_size=img_size).switch_to_inference().eval()


@torch.inference_mode()
def time_once(model: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    model(x)
    return time.perf_counter() - start


def bench(size: str, tokens: int, tokens_per_batch: int, repeats: int) -> dict:
    side = int(round(tokens**0.5))
    img = side * PATCH
    batch = max(1, tokens_per_batch // tokens)  # about the same work per call at every token count
    models = {"castling": build(f"castling_deit_{size}", img), "msa": build(f"vit_msa_deit_{size}", img)}
    x = torch.randn(batch, 3, img, img)
    macs = {kind: count_macs(m, x[:1]) for kind, m in models.items()}
    times: dict[str, list[float]] = {kind: [] for kind in models}
    for kind, m in models.items():  # warm-up: allocator, oneDNN primitive caches
        time_once(m, x)
    for _ in range(repeats):  # interleaved, so that load from elsewhere hits both alike
        for kind, m in models.items():
            times[kind].append(time_once(m, x))
    per_image = {kind: min(t) / batch for kind, t in times.items()}  # min: the least disturbed run
    return dict(size=size, tokens=tokens, batch=batch, macs=macs, per_image=per_image)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=["tiny", "small", "base"])
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS), help="patch tokens (squares)")
    parser.add_argument("--tokens-per-batch", type=int, default=3136, help="batch = this // tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    print(f"CPU, {args.threads} threads, torch {torch.__version__}; best of {args.repeats} interleaved runs")
    header = (
        f"{'model':<6} {'tokens':>6} {'batch':>5} | {'GMACs cast':>10} {'GMACs msa':>9} {'MAC ratio':>9} | "
        f"{'ms/img cast':>11} {'ms/img msa':>10} {'img/s cast':>10} {'img/s msa':>9} | "
        f"{'us/tok cast':>11} {'us/tok msa':>10} | {'speed-up':>8} {'/MAC ratio':>10} {'cast tok growth':>15}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for size in args.sizes:
        first_per_token = None
        for tokens in args.tokens:
            r = bench(size, tokens, args.tokens_per_batch, args.repeats)
            cast, msa = r["per_image"]["castling"], r["per_image"]["msa"]
            mac_ratio = r["macs"]["msa"] / r["macs"]["castling"]
            speedup = msa / cast
            per_token = {k: v / tokens * 1e6 for k, v in r["per_image"].items()}
            first_per_token = first_per_token or per_token["castling"]
            r.update(mac_ratio=mac_ratio, speedup=speedup, growth=per_token["castling"] / first_per_token)
            rows.append(r)
            print(
                f"{size:<6} {tokens:>6} {r['batch']:>5} | {r['macs']['castling'] / 1e9:>10.2f} "
                f"{r['macs']['msa'] / 1e9:>9.2f} {mac_ratio:>9.2f} | {cast * 1e3:>11.1f} {msa * 1e3:>10.1f} "
                f"{1 / cast:>10.2f} {1 / msa:>9.2f} | {per_token['castling']:>11.2f} {per_token['msa']:>10.2f} | "
                f"{speedup:>8.2f} {speedup / mac_ratio:>10.2f} {r['growth']:>15.2f}",
                flush=True,
            )
    ok_speed = all(r["speedup"] >= 0.9 * r["mac_ratio"] for r in rows)
    ok_growth = all(r["growth"] <= 1.3 for r in rows)
    print(f"target speed-up >= 0.9 x MAC ratio at every token count: {'met' if ok_speed else 'NOT met'}")
    print(f"target Castling time per token grows <= 1.3x over the token counts: {'met' if ok_growth else 'NOT met'}")
    return rows


if __name__ == "__main__":
    main()
