"""The encoders section of `bench.speed`: latency and throughput of one trained run's encoders.

Keras, SavedModel and the TFLite variants (`tbhvae.export`, `tbhvae.encoders`),
each at batch 1 (median latency) and in batches of 4096 (rows per second).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from bench.common import progress
from tbhvae.checks import first_line


def encoder_rows(run_dir: Path, features: np.ndarray, workdir: Path, variants: tuple[str, ...],
                 latency_repeats: int, throughput_rows: int) -> list[dict]:
    """Latency (batch 1) and throughput (batches of 4096) of each encoder form of a trained run."""
    try:
        from tbhvae import export
        from tbhvae.encoders import KerasEncoder, LiteEncoder, SavedModelEncoder
    except ImportError as err:
        return [{"encoder": "all", "note": f"skipped: tbhvae.export is not importable ({err})"}]

    run = export.load_run(run_dir)
    encoders = {"keras": lambda: KerasEncoder(run)}
    saved_dir = workdir / "saved_model"
    tflite_dir = workdir / "tflite"

    def saved_model():
        return SavedModelEncoder(export.export_saved_model(run, saved_dir, "encoder"))

    encoders["saved_model"] = saved_model
    for variant in variants:
        def lite(variant=variant):
            exported = export.resolve_saved_model(saved_dir / "encoder")
            paths = export.write_tflite_variants(exported, tflite_dir, export.representative_rows(features, 200),
                                                 variants=(variant,))
            return LiteEncoder(paths[variant])
        encoders[f"tflite_{variant}"] = lite

    rows = []
    sample = np.ascontiguousarray(features[:throughput_rows], dtype=np.float32)
    for name, make in encoders.items():
        try:
            encoder = make()
        except Exception as err:  # noqa: BLE001 - one failing export must not hide the others
            rows.append({"encoder": name, "note": f"skipped: {type(err).__name__}: {first_line(err)}"})
            progress(f"encoder {name}: {rows[-1]['note']}")
            continue
        latency = encoder.latency_ms(sample, batch_size=1, repeats=latency_repeats)
        encoder.encode(sample[:4096])  # warm-up at the throughput batch size
        start = time.perf_counter()
        encoder.encode(sample, batch_size=4096)
        rows.append({"encoder": name, "latency_ms": latency,
                     "rows_per_second": len(sample) / (time.perf_counter() - start), "rows": len(sample)})
        progress(f"encoder {name}: {latency:.3f} ms at batch 1, {rows[-1]['rows_per_second']:.0f} rows/s")
    return rows
