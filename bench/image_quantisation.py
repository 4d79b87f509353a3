"""Benchmark: do the quantised image encoders retrieve as well as the float model, though they flip bits?

Encodes test JPEGs of --images through the SavedModel (encode_jpeg) and
through images_float16 / images_int8 TFLite conversions of its encode_images
signature (int8 calibrated on --calibration train images), and the aligned
test features through encode_features. For each, the bit agreement with the
feature path and the tie-aware mAP@1000 of those query codes against the
database codes of the train features (the index a deployment holds).

  python -m bench.image_quantisation --saved_model exported/tbh64/1 \
      --features ../shared/data/cifar10_effnetlite0.npz --images ../shared/data/cifar10_jpeg.npz \
      --queries 1000 --json bench/results/image_quantisation.json
"""
from __future__ import annotations

import argparse

from tbhvae.cli import start_tensorflow


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--saved_model", required=True, help="an image export (a version directory)")
    parser.add_argument("--features", required=True, help="the features the model was trained on")
    parser.add_argument("--images", required=True, help="JPEG .npz aligned with --features")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--calibration", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", default="image_quantisation.json")
    args = parser.parse_args()
    start_tensorflow()
    import numpy as np

    from bench.common import machine_description, write_json
    from tbhvae.data import load_features
    from tbhvae.data.images import decode_rgb_arrays
    from tbhvae.encoders import LiteEncoder, SavedModelEncoder
    from tbhvae.evaluation import mean_average_precision
    from tbhvae.export.tflite import convert_tflite
    from tbhvae.retrieval import jpeg_rows

    features = load_features(args.features)
    encoder = SavedModelEncoder(args.saved_model)
    database = encoder.encode(features.train_features)["bits"]
    rng = np.random.default_rng(args.seed)
    rows = np.sort(rng.choice(len(features.test_labels), args.queries, replace=False))
    jpegs = jpeg_rows(args.images, "test", rows)
    pixels = decode_rgb_arrays(jpegs)
    calibration = decode_rgb_arrays(jpeg_rows(args.images, "train", np.sort(
        rng.choice(len(features.train_labels), args.calibration, replace=False))))
    reference = encoder.encode(features.test_features[rows])["bits"]
    codes = {"features (SavedModel)": reference, "JPEG (SavedModel encode_jpeg)": encoder.encode_jpeg(jpegs)["bits"]}
    for variant in ("float16", "int8"):
        model = convert_tflite(args.saved_model, variant, calibration if variant == "int8" else None,
                               signature="encode_images")
        codes[f"images_{variant}.tflite"] = LiteEncoder(model).encode_images(pixels)["bits"]
    labels = features.test_labels[rows]
    results = {}
    for name, query_codes in codes.items():
        results[name] = {"bit_agreement": float(np.mean(query_codes == reference)),
                         "map@1000": mean_average_precision(query_codes, database, labels, features.train_labels)}
        print(f"{name:32s} bit agreement {results[name]['bit_agreement']:.4f}  "
              f"mAP@1000 {results[name]['map@1000']:.4f}")
    write_json(args.json, {**machine_description(), "settings": vars(args), "results": results})


if __name__ == "__main__":
    main()
