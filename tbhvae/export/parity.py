"""Parity of exported encoders with the Keras model: code agreement, size and latency per encoder."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # encoders import tbhvae.export; parity only calls their methods
    from tbhvae.encoders import Encoder, KerasEncoder


def compare_codes(reference: dict, logits: np.ndarray, outputs: dict) -> dict:
    """Agreement of `outputs` with the reference outputs (numpy dicts) of the same rows.

    bit_agreement: fraction of equal bits; code_agreement: fraction of rows whose
    whole code is equal; max_prob_error: max |probs difference|; flipped_bits;
    max_flipped_logit: the largest reference |logit| among flipped bits (how far
    from the decision boundary a disagreement happened); packed_matches_bits:
    `packed` equals np.packbits(bits) of the same outputs.
    """
    equal = outputs["bits"] == reference["bits"]
    flipped = ~equal
    return {"bit_agreement": float(equal.mean()), "code_agreement": float(equal.all(axis=1).mean()),
            "flipped_bits": int(flipped.sum()),
            "max_flipped_logit": float(np.abs(logits[flipped]).max()) if flipped.any() else 0.0,
            "max_prob_error": float(np.abs(outputs["probs"] - reference["probs"]).max()),
            "packed_matches_bits": bool(np.array_equal(outputs["packed"], np.packbits(outputs["bits"], axis=1)))}


def parity_report(reference: KerasEncoder, candidates: dict[str, Encoder], features: np.ndarray,
                  files: dict[str, Path] | None = None, latency_repeats: int = 200) -> dict:
    """Compares each candidate encoder with the Keras model on `features` float32 [N, D].

    Returns {"examples", "bits", "rows": {name: {...compare_codes, size_bytes,
    latency_ms (batch of 1, median), batch_ms_per_example (batches of 256)}}},
    with a "keras" row for the reference itself.
    """
    files = files or {}
    expected = reference.encode(features)
    logits = reference.logits(features)
    rows = {}
    for name, encoder in {"keras": reference, **candidates}.items():
        outputs = expected if encoder is reference else encoder.encode(features, batch_size=1024)
        row = compare_codes(expected, logits, outputs)
        row["size_bytes"] = int(files[name].stat().st_size) if name in files else None
        row["latency_ms"] = encoder.latency_ms(features, 1, latency_repeats)
        row["batch_ms_per_example"] = encoder.latency_ms(features, 256, max(latency_repeats // 20, 3)) / min(
            256, len(features))
        rows[name] = row
    return {"examples": int(len(features)), "bits": reference.bits, "reference": reference.description,
            "rows": rows}


IMAGE_REPEATS = 20  # timed single-image calls per encoder (a backbone call costs ~100x a feature call)


def image_parity_report(reference: KerasEncoder, features: np.ndarray, jpegs: list[bytes], saved_model,
                        lite: dict[str, Encoder], files: dict[str, Path] | None = None) -> dict:
    """Codes from images against the feature path: the same rows as features float32 [N, D] and
    their encoded images `jpegs` [N].

    saved_model: a SavedModelEncoder with encode_jpeg (row "saved_model_jpeg"); lite: name ->
    LiteEncoder of an images_*.tflite, fed the decoded pixels uint8 [H_i, W_i, 3], one batch per size.
    Same rows and units as `parity_report`; latency_ms is per image, batch of 1, from pixels.
    """
    from tbhvae.data.images import decode_rgb_list
    from tbhvae.encoders import median_ms  # encoders import tbhvae.export: not at module level

    files = files or {}
    expected = reference.encode(features)
    logits = reference.logits(features)
    images = decode_rgb_list(jpegs)
    jpeg_latency = median_ms(functools.partial(saved_model.encode_jpeg, jpegs[:1]), IMAGE_REPEATS)
    rows = {"saved_model_jpeg": {**compare_codes(expected, logits, saved_model.encode_jpeg(jpegs)), "size_bytes": None,
                                 "latency_ms": jpeg_latency}}
    for name, encoder in lite.items():
        rows[name] = {**compare_codes(expected, logits, encode_images_by_size(encoder, images)),
                      "size_bytes": int(files[name].stat().st_size) if name in files else None,
                      "latency_ms": median_ms(functools.partial(encoder.encode_images, images[0][None]),
                                              IMAGE_REPEATS)}
    return {"examples": int(len(features)), "bits": reference.bits, "reference": f"{reference.description} "
            f"on the features of the same rows", "rows": rows}


def encode_images_by_size(encoder: Encoder, images: list[np.ndarray]) -> dict[str, np.ndarray]:
    """`encoder.encode_images` of uint8 images [H_i, W_i, 3] of any sizes, one batch per size;
    outputs in the order of `images`."""
    groups: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(image.shape, []).append(i)
    outputs: dict[str, np.ndarray] = {}
    for rows in groups.values():
        for key, value in encoder.encode_images(np.stack([images[i] for i in rows])).items():
            if key not in outputs:
                outputs[key] = np.empty((len(images), *value.shape[1:]), value.dtype)
            outputs[key][rows] = value
    return outputs


def format_parity_table(report: dict) -> str:
    """A markdown table of a parity report."""
    lines = [f"parity against the Keras model on {report['examples']} examples, {report['bits']} bits",
             "| encoder | bit agreement | codes equal | flipped bits | max |logit| flipped | max |probs| err "
             "| size (KiB) | latency (ms, batch 1) | ms/example (batch 256) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in report["rows"].items():
        size = f"{row['size_bytes'] / 1024:.1f}" if row["size_bytes"] is not None else "-"
        batch = f"{row['batch_ms_per_example']:.4f}" if "batch_ms_per_example" in row else "-"
        lines.append(f"| {name} | {100 * row['bit_agreement']:.4f}% | {100 * row['code_agreement']:.2f}% "
                     f"| {row['flipped_bits']} | {row['max_flipped_logit']:.2g} | {row['max_prob_error']:.2e} "
                     f"| {size} | {row['latency_ms']:.3f} | {batch} |")
    return "\n".join(lines)
