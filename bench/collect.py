"""Collect finished training runs into one table: mean and spread over seeds.

Reads `metrics.json` of every run directory given (as `train.py` writes it),
groups the runs by (config name, bits) and reports the tie-aware mAP@1000,
the index-ties figure beside it, full mAP, P@r2, bit balance (mean and worst
bit), distinct codes, steps and training time, averaged over the seeds found.

  python -m bench.collect runs/*/ --json bench/results/models.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from bench.common import write_json

KEYS = ("map@1000", "map@1000_index_ties", "map", "precision@r2", "bit_balance", "min_bit_balance",
        "distinct_codes", "train_seconds")


def collect(run_dirs: list[Path]) -> dict:
    """{label: {key: mean, key_std: sample std, "seeds", "steps", "bits", "runs"}} over the finished runs.

    Runs whose configs differ only in the seed form one group; the label is the
    config name and bits, plus the keys that tell apart groups sharing both.
    """
    groups: dict[str, list[tuple[dict, dict, Path]]] = {}
    for run_dir in run_dirs:
        metrics_path, config_path = run_dir / "metrics.json", run_dir / "config.json"
        if not metrics_path.is_file() or not config_path.is_file():
            print(f"skipping {run_dir}: no metrics.json (unfinished?)", file=sys.stderr)
            continue
        metrics, config = json.loads(metrics_path.read_text()), json.loads(config_path.read_text())
        if "map@1000_index_ties" not in metrics:
            print(f"skipping {run_dir}: metrics predate the tie-aware metric", file=sys.stderr)
            continue
        key = json.dumps({k: v for k, v in config.items() if k != "seed"}, sort_keys=True)
        groups.setdefault(key, []).append((metrics, config, run_dir))
    table = {}
    for runs in sorted(groups.values(), key=lambda runs: (runs[0][1]["name"], runs[0][1]["bits"])):
        config = runs[0][1]
        siblings = [json.loads(k) for k, r in groups.items()
                    if (r[0][1]["name"], r[0][1]["bits"]) == (config["name"], config["bits"])]
        differing = sorted(k for k in config if k != "seed" and len({json.dumps(s[k]) for s in siblings}) > 1)
        label = " ".join([config["name"], *(f"{k}={config[k]}" for k in differing), f"{config['bits']}b"])
        row = {"bits": config["bits"], "seeds": sorted(c["seed"] for _, c, _ in runs),
               "steps": config["steps"], "runs": sorted(str(d) for _, _, d in runs)}
        for name in KEYS:
            values = np.array([m[name] for m, _, _ in runs], dtype=np.float64)
            row[name] = float(values.mean())
            row[f"{name}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        table[label] = row
    return table


def markdown(table: dict) -> str:
    lines = ["| run | steps | seeds | mAP@1000 | [index ties] | full mAP | P@r2 | bit balance (worst) | "
             "distinct codes | train s |", "| --- |" + " --- |" * 9]
    for label, row in table.items():
        spread = f" ± {row['map@1000_std']:.3f}" if len(row["seeds"]) > 1 else ""
        lines.append(f"| {label} | {row['steps']} | {','.join(map(str, row['seeds']))} | "
                     f"{row['map@1000']:.3f}{spread} | "
                     f"[{row['map@1000_index_ties']:.3f}] | {row['map']:.3f} | {row['precision@r2']:.3f} | "
                     f"{row['bit_balance']:.2f} ({row['min_bit_balance']:.2f}) | {row['distinct_codes']:,.0f} | "
                     f"{row['train_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories (train.py --model_dir)")
    parser.add_argument("--json", type=Path, default=None, help="write the table as JSON here")
    args = parser.parse_args(argv)
    table = collect(args.run_dirs)
    print(markdown(table))
    if args.json:
        write_json(args.json, table)
    return table


if __name__ == "__main__":
    main()
