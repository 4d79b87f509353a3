"""Classic unsupervised hashing baselines on fixed feature vectors (numpy only).

Every method is a class ``Method(bits, seed=0, **options)`` with
``fit(train_features float [N, D]) -> self`` and
``encode(features float [n, D]) -> uint8 [n, bits]`` of 0/1 codes (base class
`HashingBaseline`, `base.py`); `BASELINES` maps a short name to each class:

- ``lsh``, ``pcah``, ``itq``: hyperplane methods, `linear.py` (ITQ: Gong &
  Lazebnik, CVPR 2011).
- ``sh``, ``agh``: spectral hashing (Weiss et al., NIPS 2008) and one-layer
  anchor graph hashing (Liu et al., ICML 2011), `spectral.py`.
- ``spherh``: spherical hashing (Heo et al., CVPR 2012), `spherical.py`.
- ``kmh``: k-means hashing (He et al., CVPR 2013), `kmh.py`.
- ``dgh``, ``dgh_r``: discrete graph hashing, DGH-I and DGH-R (Liu et al.,
  NeurIPS 2014), `dgh.py`.

SpherH and AGH do their iterative parts on a random training subsample, as the
papers do; see their docstrings. `run_baselines` fits and evaluates them on a
feature set (command line: `tbhvae.cli.baselines`).
"""
from __future__ import annotations

import time

from tbhvae.baselines.base import HashingBaseline, _check_bits_count
from tbhvae.baselines.dgh import DGH, DGHR
from tbhvae.baselines.kmh import KMH
from tbhvae.baselines.linear import ITQ, LSH, PCAH
from tbhvae.baselines.spectral import AGH, SH
from tbhvae.baselines.spherical import SpherH
from tbhvae.data.features import FeatureSet
from tbhvae.evaluation import code_statistics, evaluate_codes
from tbhvae.protocol import select_queries

# DGH-I and DGH-R are one class with an `init` option; DGHR only changes its default, so each
# name maps to a class that BASELINES[name](bits, seed=...) builds with the paper's settings.
BASELINES = {
    "lsh": LSH,
    "pcah": PCAH,
    "itq": ITQ,
    "sh": SH,
    "spherh": SpherH,
    "agh": AGH,
    "kmh": KMH,
    "dgh": DGH,
    "dgh_r": DGHR,
}

__all__ = ["AGH", "BASELINES", "DGH", "DGHR", "ITQ", "KMH", "LSH", "PCAH", "SH", "HashingBaseline",
           "SpherH", "markdown_table", "run_baselines"]


def run_baselines(feature_set: FeatureSet, bits_list, methods, seed: int = 0,
                  queries: str = "q10k", progress=None, curves: bool = False) -> dict:
    """Fits every method at every code length on the train split and evaluates retrieval.

    Database = train features, queries = the `queries` subset of the test
    features (one of `tbhvae.protocol.QUERY_SETS`). Returns {method: {str(bits):
    {"map@1000" (tie-aware), "map", "precision@r2", "map@1000_index_ties" (the
    older convention), "bit_balance", "min_bit_balance", "distinct_codes",
    "fit_seconds"}}}, with `curves` also evaluate_codes' curves (PR by radius,
    precision@N); calls `progress(method, bits, metrics)` after each fit.
    """
    unknown = [m for m in methods if m not in BASELINES]
    if unknown or not methods:
        raise ValueError(f"methods: unknown {', '.join(unknown) or '(none given)'}; "
                         f"choose from {','.join(BASELINES)}")
    if not bits_list:
        raise ValueError("bits_list: give at least one code length")
    bits_list = [_check_bits_count(bits) for bits in bits_list]
    misfits = []  # all of them, before the first fit: an hour of fitting must not end in this error
    for method in methods:
        for bits in bits_list:
            try:
                BASELINES[method](bits, seed=seed).check_fits(*feature_set.train_features.shape)
            except ValueError as err:
                misfits.append(str(err))
    if misfits:
        raise ValueError("; ".join(misfits))
    query_rows = select_queries(feature_set.test_labels, queries)
    query_features = feature_set.test_features[query_rows]
    query_labels = feature_set.test_labels[query_rows]
    results = {}
    for method in methods:
        results[method] = {}
        for bits in bits_list:
            model = BASELINES[method](bits, seed=seed)
            started = time.perf_counter()
            model.fit(feature_set.train_features)
            fit_seconds = time.perf_counter() - started
            db_codes = model.encode(feature_set.train_features)
            metrics = evaluate_codes(model.encode(query_features), db_codes, query_labels,
                                     feature_set.train_labels, curves=curves, index_ties=True)
            metrics.update(code_statistics(db_codes), fit_seconds=fit_seconds)
            results[method][str(bits)] = metrics
            if progress is not None:
                progress(method, bits, metrics)
    return results


def markdown_table(results: dict) -> str:
    """Method x bits table of tie-aware mAP@1000, the index-ties figure in brackets, and the fit time."""
    bits_list = sorted({int(b) for per_bits in results.values() for b in per_bits})
    lines = ["| method | " + " | ".join(f"{b} bits mAP@1000 [index ties] (fit s)" for b in bits_list) + " |",
             "| --- |" + " --- |" * len(bits_list)]
    for method, per_bits in results.items():
        cells = [f"{per_bits[str(b)]['map@1000']:.3f} [{per_bits[str(b)]['map@1000_index_ties']:.3f}] "
                 f"({per_bits[str(b)]['fit_seconds']:.1f})"
                 if str(b) in per_bits else "" for b in bits_list]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
