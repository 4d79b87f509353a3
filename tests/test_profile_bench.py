"""bench.step_profile (the profiler's step breakdown) and bench.cost_curves (one point, and the table)."""
import json

import pytest

from bench import common, cost_curves, step_profile


def test_op_kinds_group_the_profiled_ops():
    assert step_profile.op_kind("_MklNativeFusedMatMul", "encoder/encoder_hidden/Relu") == "matmul"
    assert step_profile.op_kind("ResourceApplyAdam", "actor_adam/ResourceApplyAdam_3") == "optimizer"
    assert step_profile.op_kind("Mul", "critic_adam/Mul_2") == "optimizer"
    assert step_profile.op_kind("Cast", "encoder/Cast") == "cast"
    assert step_profile.op_kind("Pow", "Pow") == "other"
    shares = step_profile.breakdown([{"type": "MatMul", "name": "a", "self_us": 3.0},
                                     {"type": "Cast", "name": "b", "self_us": 1.0}])
    assert shares["kinds"]["matmul"] == 0.75 and shares["kinds"]["cast"] == 0.25
    assert sum(shares["kinds"].values()) == pytest.approx(1.0)


def test_step_profile_of_a_real_step_is_mostly_its_matmuls(tmp_path):
    pytest.importorskip("xprof", reason="tensorboard-plugin-profile (extra tbhvae[profile]) not installed")
    features = common.random_features(800, 100, 64)
    row = step_profile.profile_step("tbh", "float32", features, tmp_path, bits=16, batch=200, warmup=2,
                                    steps=3, profile_steps=3)
    assert sum(row["kinds"].values()) == pytest.approx(1.0)
    assert row["kinds"]["matmul"] > 0.2 and row["kinds"]["optimizer"] > 0.0  # Adam ran and was traced
    assert row["examples_per_second"] > 0 and tmp_path.joinpath("tbh_float32").is_dir()


def test_cost_point_counts_the_batch_terms_and_memory(capsys):
    cost_curves.main(["--point", "tbhvae,mixed_bfloat16,64,16,32", "--steps", "2"])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (row["batch"], row["bits"], row["dim"], row["precision"]) == (64, 16, 32, "mixed_bfloat16")
    assert 0.0 < row["batch_flop_share"] < 1.0 and row["peak_mb"] >= row["model_mb"] > 0
    with pytest.raises(SystemExit, match="unknown model or precision"):
        cost_curves.main(["--models", "vgg"])
