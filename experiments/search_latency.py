"""Query latency of ``vlm_jax.search``'s backends at scale: exact numpy vs usearch HNSW.

    python experiments/search_latency.py [--n 1000000] [--dim 768] [--queries 100] [--threads 0]

Builds ``--n`` random unit vectors float32 [n, dim] (a stand-in for an index of
image embeddings; the uniform sphere is the hardest case for a graph index, since
its nearest neighbours are barely nearer than the rest) and ``--queries`` query
vectors: fresh random ones (``--query_kind random``) or indexed vectors plus a
little noise (``near``, like a search for a near-duplicate). For each query, top-10:

  exact  ``search.exact_topk``: one [n, dim] x [dim] matmul and an argpartition
  ann    ``search.AnnIndex`` (the ``--backend ann`` of the CLI) candidates

and prints the median latency of each (ms), the ANN index build time (s), the
ANN recall@10 against the exact top-10 (mean fraction of the true 10 found) and
how often the two top-1s agree. ``--no_ann`` times the exact backend alone.
Needs ``pip install 'vlm_jax[search]'``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from vlm_jax.search import AnnIndex, exact_topk


def random_unit(rng: np.random.Generator, n: int, dim: int, chunk: int = 100_000) -> np.ndarray:
  """float32 [n, dim] unit vectors, generated in chunks to bound peak memory."""
  out = np.empty((n, dim), np.float32)
  for start in range(0, n, chunk):
    x = rng.standard_normal((min(chunk, n - start), dim), dtype=np.float32)
    out[start:start + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--n", type=int, default=1_000_000, help="indexed vectors")
  parser.add_argument("--dim", type=int, default=768, help="embedding width")
  parser.add_argument("--queries", type=int, default=100, help="timed queries")
  parser.add_argument("--k", type=int, default=10)
  parser.add_argument("--query_kind", choices=("random", "near"), default="random")
  parser.add_argument("--threads", type=int, default=0, help="ANN build threads (0: all)")
  parser.add_argument("--ef", type=int, default=None,
                      help="HNSW expansion_search (default: usearch's, 64)")
  parser.add_argument("--no_ann", action="store_true", help="time the exact backend only")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  rng = np.random.default_rng(args.seed)
  t0 = time.perf_counter()
  emb = random_unit(rng, args.n, args.dim)
  if args.query_kind == "random":
    q = random_unit(rng, args.queries, args.dim)
  else:
    picks = rng.integers(0, args.n, args.queries)
    q = emb[picks] + 0.05 * random_unit(rng, args.queries, args.dim)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
  print(f"{args.n} x {args.dim} vectors in {time.perf_counter() - t0:.1f}s", flush=True)

  exact_ms, truth, exact_first = [], [], []
  for v in q:
    t = time.perf_counter()
    rows, _ = exact_topk(emb, v, args.k)
    exact_ms.append(1e3 * (time.perf_counter() - t))
    truth.append(set(rows.tolist()))
    exact_first.append(rows[0])

  result = {"n": args.n, "dim": args.dim, "queries": args.queries, "k": args.k,
            "query_kind": args.query_kind,
            "exact_median_ms": round(float(np.median(exact_ms)), 3)}
  print(f"{'backend':8s} {'median ms':>10s}  notes")
  print(f"{'exact':8s} {result['exact_median_ms']:10.2f}  numpy float32 matmul + argpartition",
        flush=True)
  if args.no_ann:
    print(json.dumps(result))
    return
  t = time.perf_counter()
  ann = AnnIndex.build(emb, threads=args.threads)
  build_s = time.perf_counter() - t
  if args.ef:
    ann.index.expansion_search = args.ef
  ann_ms, recall, top1 = [], [], []
  for v, true, first in zip(q, truth, exact_first):
    t = time.perf_counter()
    rows = ann.search(v, args.k)
    ann_ms.append(1e3 * (time.perf_counter() - t))
    recall.append(len(true & set(rows.tolist())) / len(true))
    top1.append(len(rows) > 0 and rows[0] == first)

  result.update({"ann_median_ms": round(float(np.median(ann_ms)), 3),
                 "ann_build_s": round(build_s, 1),
                 f"ann_recall@{args.k}": round(float(np.mean(recall)), 4),
                 "ann_top1_agrees": round(float(np.mean(top1)), 4),
                 "ann_expansion_search": int(ann.index.expansion_search)})
  print(f"{'ann':8s} {result['ann_median_ms']:10.2f}  usearch HNSW f16, build "
        f"{build_s:.1f}s, recall@{args.k} {result[f'ann_recall@{args.k}']:.3f}, "
        f"top-1 agrees {result['ann_top1_agrees']:.2f}")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
