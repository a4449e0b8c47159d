"""Time of ``retrieval_metrics`` on N x D random features, against its floor in the same run.

The floor is the N x N similarity product that the exact metrics need (timed as a full
``x @ x.T`` and as the symmetric half product that ``retrieval_metrics`` builds); the
target is 10,000 x 2,048 in <= 1.5 s on 2 CPU cores.

python benchmarks/retrieval_speed.py --n 10000 --dim 2048 --classes 200
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, List

import numpy as np
import torch

from lcr_lightly.eval import l2_normalize, retrieval_metrics


def _times(run: Callable[[], object], repeats: int) -> List[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        out.append(time.perf_counter() - start)
    return out


def _median(values: List[float]) -> float:
    return sorted(values)[len(values) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    labels = rng.integers(0, args.classes, args.n)
    centers = rng.normal(size=(args.classes, args.dim)).astype(np.float32)
    feats = centers[labels] + 2 * rng.normal(size=(args.n, args.dim)).astype(np.float32)
    xt = torch.from_numpy(l2_normalize(feats))
    result: dict = {}

    def half_product() -> None:  # what retrieval_metrics builds: the upper block-triangle
        full = torch.empty(args.n, args.n)
        for i in range(0, args.n, 1024):
            block = xt[i : i + 1024] @ xt[i:].T
            full[i : i + 1024, i:] = block
            full[i:, i : i + 1024] = block.T

    def metrics() -> None:
        result.update(retrieval_metrics(feats, labels))

    # interleaved, so that load from other processes hits all three alike
    full_t, half_t, metric_t = [], [], []
    for _ in range(args.repeats):
        full_t += _times(lambda: xt @ xt.T, 1)
        half_t += _times(half_product, 1)
        metric_t += _times(metrics, 1)
    print(
        f"N={args.n} D={args.dim} classes={args.classes} threads={torch.get_num_threads()}, "
        f"{args.repeats} runs (best / median):"
    )
    print(f"  full product x @ x.T:    {min(full_t):.2f} / {_median(full_t):.2f} s")
    print(f"  symmetric half product:  {min(half_t):.2f} / {_median(half_t):.2f} s")
    print(
        f"  retrieval_metrics:       {min(metric_t):.2f} / {_median(metric_t):.2f} s "
        f"(rank1={result['rank1']:.3f}, mAP={result['mAP']:.3f})"
    )
    print(
        f"  ratio metrics / full product: {min(metric_t) / min(full_t):.2f}x, "
        f"metrics / half product: {min(metric_t) / min(half_t):.2f}x (best runs)"
    )


if __name__ == "__main__":
    main()
