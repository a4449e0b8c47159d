"""Time of ``retrieval_metrics`` on N x D random features (target: 10,000 x 2,048 <= 5 s).

python benchmarks/retrieval_speed.py --n 10000 --dim 2048 --classes 200
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from lcr_lightly.eval import retrieval_metrics


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
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        res = retrieval_metrics(feats, labels)
        times.append(time.perf_counter() - start)
    print(
        f"N={args.n} D={args.dim} classes={args.classes} threads={torch.get_num_threads()}: "
        f"best {min(times):.2f} s, median {sorted(times)[len(times) // 2]:.2f} s over "
        f"{args.repeats} runs (rank1={res['rank1']:.3f}, mAP={res['mAP']:.3f})"
    )


if __name__ == "__main__":
    main()
