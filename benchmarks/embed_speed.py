"""Embedding throughput (exported vs hooked model) and search cost (exact vs HNSW), in one run.

Part 1 embeds random image batches with the demo's architecture (EfficientNet-Lite0 +
LCR at 128 px; random weights: speed does not depend on them) four ways, taking turns
so that machine noise hits all alike: the wrapped model with its hooks (``model(x)``,
rationale pooling), the exported :class:`~lcr_lightly.export.Embedder` (eager), the
same under ``torch.compile`` and the ONNX file on onnxruntime. It prints images/s and
the ratios to the hooked model, and the largest difference of the outputs.

Part 2 searches galleries of 10^3 ... 10^6 synthetic L2-normalised features (clustered,
like image features; 10^6 only with ``--sizes``) with an exact faiss ``IndexFlatIP``
and with HNSW at the gallery's parameters
(:data:`~lcr_lightly.eval.retrieval.HNSW_DEFAULTS`): build seconds, queries/s and the
recall@10 of HNSW against the exact top 10.

    nice python benchmarks/embed_speed.py                          # a few minutes on 2 cores
    nice python benchmarks/embed_speed.py --sizes 1000 10000 100000 1000000
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch

from lcr_lightly import export_embedder, save_embedder, set_pooling
from lcr_lightly.eval.retrieval import HNSW_DEFAULTS, hnsw_index, l2_normalize
from lcr_lightly.experiments.build import make_model
from lcr_lightly.experiments.config import ExperimentConfig


def _rate(run: Callable[[], object], images: int) -> float:
    start = time.perf_counter()
    run()
    return images / (time.perf_counter() - start)


def embedding(args: argparse.Namespace) -> None:
    import onnxruntime

    cfg = ExperimentConfig(
        backbone=args.backbone, image_size=args.image_size, lcr=True, weights=None
    )
    torch.manual_seed(0)
    model = make_model(cfg).eval()
    set_pooling(model, "rationale")
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    embedder = export_embedder(model, "rationale", normalize=False, input_size=args.image_size)
    start = time.perf_counter()
    compiled = torch.compile(embedder) if args.compile else embedder
    with torch.no_grad():
        compiled(x)
    compile_s = time.perf_counter() - start
    runs: Dict[str, Callable[[], object]] = {
        "hooked model(x)": lambda: model(x),
        "exported (eager)": lambda: embedder(x),
    }
    if args.compile:
        runs["exported + torch.compile"] = lambda: compiled(x)
    if args.onnx:
        onnx_file = Path(tempfile.mkdtemp()) / "embedder.onnx"
        save_embedder(embedder, onnx_file, "onnx")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = onnxruntime.InferenceSession(
            str(onnx_file), options, providers=["CPUExecutionProvider"]
        )
        feed = {"images": x.numpy()}
        runs["exported ONNX (onnxruntime)"] = lambda: torch.from_numpy(session.run(None, feed)[0])
    with torch.no_grad():
        reference = model(x)
        diffs = {
            name: float((run() - reference).abs().max())
            for name, run in runs.items()
            if name != "hooked model(x)"
        }
        for run in runs.values():  # warm-up
            run()
        rates: Dict[str, List[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                rates[name].append(_rate(run, args.batch_size))
    base = statistics.median(rates["hooked model(x)"])
    print(
        f"Embedding: {args.backbone} + LCR, {args.image_size} px, batch {args.batch_size}, "
        f"{args.repeats} interleaved repeats, {torch.get_num_threads()} threads"
        + (f" (torch.compile took {compile_s:.0f} s once)" if args.compile else "")
    )
    print("| path | images/s (median) | ratio to hooked | max abs diff to hooked |")
    print("|---|---:|---:|---:|")
    for name, values in rates.items():
        rate = statistics.median(values)
        diff = "0 (reference)" if name not in diffs else f"{diffs[name]:.1e}"
        print(f"| {name} | {rate:.1f} | {rate / base:.2f}x | {diff} |")


def _features(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """Synthetic embeddings near a low-dimensional set, as image features are.

    A mixture of n / 100 Gaussian clusters in a 32-d latent space, mapped linearly to d
    dimensions, plus isotropic noise (10 % of the signal's scale), L2-normalised.
    """
    latent = 32
    centres = rng.standard_normal((max(n // 100, 10), latent)).astype(np.float32)
    z = centres[rng.integers(0, len(centres), n)]
    z += 0.5 * rng.standard_normal((n, latent)).astype(np.float32)
    mix = rng.standard_normal((latent, d)).astype(np.float32) / np.sqrt(latent)
    x = z @ mix
    x += 0.1 * rng.standard_normal((n, d)).astype(np.float32)
    return l2_normalize(x)


def search(args: argparse.Namespace) -> None:
    import faiss

    faiss.omp_set_num_threads(torch.get_num_threads())
    params = HNSW_DEFAULTS
    print(
        f"\nSearch: {args.dim}-d synthetic features (32-d latent clusters), "
        f"{args.queries} queries, k=10, "
        f"HNSW M={params['M']} efConstruction={params['ef_construction']} "
        f"efSearch={params['ef_search']}, {torch.get_num_threads()} threads"
    )
    print(
        "| gallery | exact queries/s | HNSW build s | HNSW queries/s | HNSW / exact "
        "speed | HNSW recall@10 |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        rng = np.random.default_rng(0)
        x = _features(n, args.dim, rng)
        queries = l2_normalize(
            x[rng.integers(0, n, args.queries)]
            + 0.3 * rng.standard_normal((args.queries, args.dim)).astype(np.float32)
        )
        exact = faiss.IndexFlatIP(args.dim)
        exact.add(x)
        start = time.perf_counter()
        _, truth = exact.search(queries, 10)
        exact_rate = args.queries / (time.perf_counter() - start)
        start = time.perf_counter()
        index = hnsw_index(x, params["M"], params["ef_construction"], params["ef_search"])
        build = time.perf_counter() - start
        start = time.perf_counter()
        _, found = index.search(queries, 10)
        hnsw_rate = args.queries / (time.perf_counter() - start)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)])
        print(
            f"| {n:,} | {exact_rate:,.0f} | {build:.1f} | {hnsw_rate:,.0f} | "
            f"{hnsw_rate / exact_rate:.1f}x | {recall:.3f} |"
        )
        del exact, index, x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--skip-embedding", action="store_true")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--no-onnx", dest="onnx", action="store_false")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}")
    if not args.skip_embedding:
        embedding(args)
    search(args)


if __name__ == "__main__":
    main()
