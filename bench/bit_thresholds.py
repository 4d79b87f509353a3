"""Benchmark: would other per-bit thresholds than 0 on a trained model's logits retrieve better?

Encodes the train (database) and q10k test (query) features of a run to hash logits and
thresholds them at 0 (the model's codes), at each bit's median database logit (every bit
splits the database in half) and halfway between the two. Prints tie-aware mAP@1000, bit
balance (worst bit) and distinct database codes for each, and writes them to --json.

  python -m bench.bit_thresholds --model_dir RUN --features ../shared/data/cifar10_effnetlite0.npz \
      --json bench/results/bit_thresholds_RUN.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if not __package__:  # run as `python bench/bit_thresholds.py`: the repository root holds `bench`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tbhvae.cli import start_tensorflow


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True, help="a finished training run")
    parser.add_argument("--features", required=True, help="the features the run was trained on")
    parser.add_argument("--json", default="bit_thresholds.json")
    args = parser.parse_args(argv)
    start_tensorflow()

    import numpy as np

    from tbhvae import evaluation
    from tbhvae.data import load_features
    from tbhvae.export.savedmodel import load_run
    from tbhvae.hashing_model import encode_features
    from tbhvae.protocol import select_queries

    model = load_run(args.model_dir).model
    feature_set = load_features(args.features)
    queries = select_queries(feature_set.test_labels, "q10k")
    db_logits = encode_features(model, feature_set.train_features, output="logits")
    query_logits = encode_features(model, feature_set.test_features[queries], output="logits")
    median = np.median(db_logits, axis=0)
    results = {}
    for name, threshold in (("zero", np.zeros_like(median)), ("halfway", median / 2), ("median", median)):
        db_codes = (db_logits > threshold).astype(np.uint8)
        query_codes = (query_logits > threshold).astype(np.uint8)
        score = evaluation.mean_average_precision(query_codes, db_codes, feature_set.test_labels[queries],
                                                  feature_set.train_labels, top_k=1000)
        results[name] = {"map@1000": score, **evaluation.code_statistics(db_codes)}
        print(f"{name:8s} mAP@1000 {score:.4f}  bit balance {results[name]['bit_balance']:.3f} "
              f"(worst {results[name]['min_bit_balance']:.3f})  {results[name]['distinct_codes']} distinct codes")
    Path(args.json).write_text(json.dumps({"model_dir": args.model_dir, "features": args.features,
                                           "thresholds": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
