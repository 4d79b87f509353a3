"""Bad inputs and faults end in one clear line and change nothing on disk (issue #16, tracebacks).

One row per case: the exit code 2 of a command (one `error:` line) or the exception type of
a library call, a message naming the problem, and where nothing should change, the
run / export / index directory byte-identical afterwards (a hash of every file).
A full disk is simulated by making the writer raise what it raises then (OSError ENOSPC,
or TF's ResourceExhaustedError), and is real on a 4 MiB tmpfs where mount is allowed (root).
The command-line table (MISUSE) is the new user's misuse of every command, each row one line.
"""
import dataclasses
import errno
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO_ROOT
from tbhvae import evaluation, export, retrieval, train
from tbhvae.config import Config
from tbhvae.data import DataError, FeatureSet, load_features, save_features
from tbhvae.export import ExportError, savedmodel
from tbhvae.train import TrainingError
from test_reliability import error_line, run_cli, train_command
from test_training import synthetic_features

TINY = dict(bits=8, hidden_dim=16, continuous_dim=8, batch_size=64, steps=10, log_every=5, checkpoint_every=5,
            eval_every=0, eval_queries=20, jit_compile=False, steps_per_execution=5)


def hashes(directory: Path) -> dict:
    """Relative path -> sha256 of every file below `directory` (links not followed)."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{"features": feature file, "run": a finished 10-step run, "config": its Config}."""
    folder = tmp_path_factory.mktemp("faults")
    feature_set = synthetic_features(n=256, q=32)
    features = save_features(folder / "features.npz", feature_set)
    config = Config(name="faults", features=str(features), **TINY)
    train.train(config, folder / "run", strategy=tf.distribute.get_strategy(), feature_set=feature_set)
    return {"features": features, "run": folder / "run", "config": config, "feature_set": feature_set}


@pytest.fixture
def run_copy(tiny, tmp_path):
    return Path(shutil.copytree(tiny["run"], tmp_path / "run", symlinks=True))


# ------------------------------------------------------------------ feature files
def _npy_file(path):
    np.save(path, np.zeros((4, 3), np.float32))
    return path


def _huge_header_npz(path):
    """A few hundred bytes whose train_features header claims 10^13 float32 values."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**13,)})
    with zipfile.ZipFile(path, "w") as archive:
        for key in ("train_features", "train_labels", "test_features", "test_labels"):
            archive.writestr(f"{key}.npy", header.getvalue() + bytes(16))
    return path


FEATURE_FILES = {
    "npy_not_npz": (_npy_file, "x.npy", r"x\.npy: a single \.npy array, not an \.npz feature file"),
    "header_claims_1e13": (_huge_header_npz, "huge.npz", r"'train_features' claims shape \(10000000000000,\).*corrupt"),
}


@pytest.mark.parametrize("case", FEATURE_FILES)
def test_bad_feature_file_is_one_data_error(tmp_path, case):
    make, name, message = FEATURE_FILES[case]
    path = make(tmp_path / name)
    with pytest.raises(DataError, match=message) as caught:
        load_features(path)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("case", FEATURE_FILES)
def test_train_cli_rejects_bad_feature_file_with_one_line(tmp_path, case):
    make, name, message = FEATURE_FILES[case]
    path = make(tmp_path / name)
    result = run_cli(train_command(path, tmp_path / "run"), timeout=120)
    assert result.returncode == 2
    assert re.search(message, error_line(result.stderr))
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ run directory
def _random_index(run):
    (run / "checkpoints" / "checkpoint").write_bytes(np.random.default_rng(0).bytes(200) + b"\xff\xfe")


def _random_index_no_checkpoint(run):
    _random_index(run)
    for path in (run / "checkpoints").glob("ckpt-*"):
        path.unlink()


def _corrupt_data_json(run):
    (run / "data.json").write_bytes(b'{"input_dim": 24, "data')


RUN_DAMAGE = {  # damage, call on the damaged run, exception, message
    "checkpoint_index_random_bytes_no_checkpoint_export": (
        _random_index_no_checkpoint, "export", ExportError, r"checkpoint exists but no intact checkpoint"),
    "checkpoint_index_random_bytes_no_checkpoint_train": (
        _random_index_no_checkpoint, "train", TrainingError, r"checkpoint exists but no intact checkpoint.*--fresh"),
    "corrupt_data_json_export": (_corrupt_data_json, "export", ExportError, r"data\.json is missing or lacks"),
    "corrupt_data_json_train": (_corrupt_data_json, "train", DataError, r"data\.json: unreadable.*--fresh"),
}


def _call(kind, run, tiny):
    if kind == "export":
        return export.load_run(run)
    return train.train(tiny["config"], run, strategy=tf.distribute.get_strategy(), feature_set=tiny["feature_set"])


@pytest.mark.parametrize("case", RUN_DAMAGE)
def test_damaged_run_directory_is_one_error_and_left_alone(run_copy, tiny, case):
    damage, kind, error, message = RUN_DAMAGE[case]
    damage(run_copy)
    before = hashes(run_copy)
    with pytest.raises(error, match=message) as caught:
        _call(kind, run_copy, tiny)
    assert "\n" not in str(caught.value)
    assert hashes(run_copy) == before


def test_random_bytes_in_checkpoint_index_fall_back_to_the_newest_intact_checkpoint(run_copy, capsys):
    _random_index(run_copy)
    before = hashes(run_copy)
    run = export.load_run(run_copy)
    assert run.checkpoint.endswith("ckpt-10")
    assert "is unreadable; resuming from the newest intact checkpoint" in capsys.readouterr().err
    assert hashes(run_copy) == before


def test_full_disk_during_a_checkpoint_save_stops_with_one_line_keeping_the_last_checkpoint(
        run_copy, tiny, monkeypatch):
    def full_disk(self, *args, **kwargs):
        raise tf.errors.ResourceExhaustedError(None, None, "ckpt-15_temp/part-00000: No space left on device")

    monkeypatch.setattr(tf.train.CheckpointManager, "save", full_disk)
    before = hashes(run_copy / "checkpoints")
    config = dataclasses.replace(tiny["config"], steps=20)
    with pytest.raises(TrainingError, match=r"cannot write the checkpoint of step 15 \(.*No space left on device"
                                            r"\); the last good one .*ckpt-10\) was kept"):
        train.train(config, run_copy, strategy=tf.distribute.get_strategy(), feature_set=tiny["feature_set"])
    assert hashes(run_copy / "checkpoints") == before


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 4 MiB tmpfs mounted for the test (root on Linux); skips where the platform does not allow it."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True) if shutil.which("mount") else None
    if mounted is None or mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() if mounted else 'no mount command'})")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def fill_disk(directory: Path, leave_bytes: int) -> Path:
    """Writes a filler file until `directory`'s file system has about `leave_bytes` free."""
    filler = directory / "filler"
    with open(filler, "wb") as out:
        out.write(bytes(max(shutil.disk_usage(directory).free - leave_bytes, 0)))
    return filler


def test_real_full_disk_on_a_tmpfs_stops_with_one_line_and_the_run_resumes_once_space_is_freed(
        tiny, small_tmpfs):
    run = Path(shutil.copytree(tiny["run"], small_tmpfs / "run"))
    checkpoint_size = sum(p.stat().st_size for p in (run / "checkpoints").glob("ckpt-10.*"))
    filler = fill_disk(small_tmpfs, checkpoint_size // 2)  # room for half a checkpoint
    before = hashes(run / "checkpoints")
    config = dataclasses.replace(tiny["config"], steps=20)
    with pytest.raises(Exception) as caught:
        train.train(config, run, strategy=tf.distribute.get_strategy(), feature_set=tiny["feature_set"])
    message = str(caught.value)
    assert isinstance(caught.value, TrainingError), f"{type(caught.value).__name__}: {message}"
    assert "\n" not in message and "No space left on device" in message, message
    after = hashes(run / "checkpoints")
    changed = [name for name, digest in before.items() if name != "checkpoint" and after.get(name) != digest]
    assert not changed, f"intact checkpoint files changed or lost: {changed}"
    filler.unlink()
    train.train(config, run, strategy=tf.distribute.get_strategy(), feature_set=tiny["feature_set"])
    assert tf.train.latest_checkpoint(str(run / "checkpoints")).endswith("ckpt-20")
    assert not list((run / "checkpoints").glob("*_temp*"))


def test_full_disk_while_writing_metrics_is_one_line_and_keeps_the_old_metrics(run_copy, tiny, monkeypatch):
    from tbhvae.train import loop

    def full_disk(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(loop, "atomic_write", full_disk)
    before = (run_copy / "metrics.json").read_bytes()
    with pytest.raises(TrainingError, match=r"metrics\.json: cannot write the metrics \(No space left on device\)"):
        train.train(tiny["config"], run_copy, strategy=tf.distribute.get_strategy(), feature_set=tiny["feature_set"])
    assert (run_copy / "metrics.json").read_bytes() == before


# ------------------------------------------------------------------ export
@pytest.fixture(scope="module")
def restored(tiny):
    return export.load_run(tiny["run"])


def _file_out(tmp_path):
    (tmp_path / "out").write_text("not a directory")
    return tmp_path / "out"


def _file_in_path(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    return tmp_path / "file" / "out"


def _read_only_out(tmp_path, monkeypatch):
    """A read-only directory; access() is patched too, since root (as in CI) may write anywhere."""
    out = tmp_path / "readonly"
    out.mkdir()
    out.chmod(0o555)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != out and real_access(p, mode, **kw))
    return out


EXPORT_OUTS = {
    "out_is_a_file": (lambda tmp, mp: _file_out(tmp), r"out is a file, not a directory"),
    "file_in_out_path": (lambda tmp, mp: _file_in_path(tmp), r"file is a file, not a directory"),
    "out_read_only": (_read_only_out, r"readonly is not writable"),
}


@pytest.mark.parametrize("case", EXPORT_OUTS)
def test_export_into_an_unwritable_out_is_one_export_error(restored, tmp_path, monkeypatch, case):
    make, message = EXPORT_OUTS[case]
    out = make(tmp_path, monkeypatch)
    before = hashes(tmp_path)
    with pytest.raises(ExportError, match=message) as caught:
        export.export_saved_model(restored, out, "tbh")
    assert "\n" not in str(caught.value)
    assert hashes(tmp_path) == before


def test_export_cli_checks_tflite_dir_before_writing_the_saved_model(tiny, tmp_path):
    (tmp_path / "tflite").write_text("not a directory")
    command = [sys.executable, str(REPO_ROOT / "export.py"), "--model_dir", str(tiny["run"]),
               "--out", str(tmp_path / "exported"), "--tflite_dir", str(tmp_path / "tflite")]
    result = run_cli(command, timeout=240)
    assert result.returncode == 2
    assert re.search(r"--tflite_dir .*tflite: is a file; pass a directory path", error_line(result.stderr))
    assert not (tmp_path / "exported").exists()


def test_export_racing_for_the_same_version_takes_the_next_one(restored, tmp_path, monkeypatch):
    """Another export creates version 1 between our choice of it and our rename."""
    other = tmp_path / "out" / "tbh" / "1"
    other.mkdir(parents=True)
    (other / "saved_model.pb").write_bytes(b"the other export")
    real_next_version = savedmodel.next_version
    calls = []

    def stale_next_version(root):
        calls.append(root)
        return 1 if len(calls) == 1 else real_next_version(root)

    monkeypatch.setattr(savedmodel, "next_version", stale_next_version)
    path = export.export_saved_model(restored, tmp_path / "out", "tbh")
    assert path == tmp_path / "out" / "tbh" / "2" and (path / "saved_model.pb").is_file()
    assert (other / "saved_model.pb").read_bytes() == b"the other export"
    assert sorted(p.name for p in (tmp_path / "out" / "tbh").iterdir()) == ["1", "2"]


def test_full_disk_during_export_leaves_no_version(restored, tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(savedmodel, "write_warmup_requests", full_disk)
    with pytest.raises(ExportError, match=r"cannot write the export \(.*No space left on device.*nothing was kept"):
        export.export_saved_model(restored, tmp_path / "out", "tbh")
    assert list((tmp_path / "out" / "tbh").iterdir()) == []


# ------------------------------------------------------------------ output paths checked before the work
@pytest.fixture
def no_encoding(monkeypatch):
    """Fails the test if the (long) encoding starts."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the work started before the output path was checked")

    monkeypatch.setattr(retrieval, "encode_split", forbidden)


def test_index_path_is_checked_before_encoding(tiny, tmp_path, no_encoding):
    (tmp_path / "file").write_text("x")
    with pytest.raises(retrieval.RetrievalError, match=r"--index .*file is a file, not a directory"):
        retrieval.build(str(tiny["run"]), str(tiny["features"]), None, str(tmp_path / "file" / "train.index.npz"))
    assert hashes(tmp_path) == {"file": hashlib.sha256(b"x").hexdigest()}


def test_results_path_is_checked_before_the_search(tiny, tmp_path, no_encoding):
    (tmp_path / "results.json").mkdir()
    with pytest.raises(retrieval.RetrievalError, match=r"--results .*results\.json: is a directory"):
        retrieval.query(str(tiny["run"]), str(tiny["features"]), None, str(tmp_path / "missing.npz"), 10, 0,
                        str(tmp_path / "results.json"), 0, False)


@pytest.mark.parametrize("k, queries, message", [
    (10, -3, r"--queries: expected a non-negative integer, got -3"),  # searched nothing: precision nan
    (10, 2.5, r"--queries: expected a non-negative integer, got 2\.5"),
    (0, 5, r"--k: expected a positive integer, got 0"),
])
def test_retrieval_counts_are_checked_before_the_work(tiny, tmp_path, no_encoding, k, queries, message):
    with pytest.raises(retrieval.RetrievalError, match=message) as caught:
        retrieval.query(str(tiny["run"]), str(tiny["features"]), None, str(tmp_path / "missing.npz"), k, queries,
                        str(tmp_path / "results.json"), 0, False)
    assert "\n" not in str(caught.value) and not list(tmp_path.iterdir())


def test_full_disk_while_saving_the_index_is_one_error(tiny, tmp_path, monkeypatch):
    def full_disk(self, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    from tbhvae.index import HammingIndex
    monkeypatch.setattr(HammingIndex, "save", full_disk)
    with pytest.raises(retrieval.RetrievalError, match=r"--index .*cannot write it \(No space left on device\)"):
        retrieval.build(str(tiny["run"]), str(tiny["features"]), None, str(tmp_path / "train.index.npz"))
    assert not (tmp_path / "train.index.npz").exists()


@pytest.mark.parametrize("where, message", [
    ("file/out.json", r"--json \S+file/out\.json: \S+file is a file, not a directory"),
    ("directory", r"--json \S+directory: is a directory; pass a file path"),
])
def test_baselines_json_is_checked_before_fitting(tiny, tmp_path, where, message):
    (tmp_path / "file").write_text("x")
    (tmp_path / "directory").mkdir()
    command = [sys.executable, "-m", "tbhvae.cli.baselines", "--features", str(tiny["features"]),
               "--bits", "8", "--methods", "lsh", "--json", str(tmp_path / where)]
    result = run_cli(command, timeout=120)
    assert result.returncode == 2
    assert re.search(message, error_line(result.stderr))
    assert "lsh 8 bits" not in result.stderr  # nothing was fitted
    assert hashes(tmp_path) == {"file": hashlib.sha256(b"x").hexdigest()}


def test_baselines_refuse_every_code_length_a_method_cannot_fit_before_fitting(tiny, tmp_path):
    dim = load_features(tiny["features"]).dim
    command = [sys.executable, "-m", "tbhvae.cli.baselines", "--features", str(tiny["features"]),
               "--bits", f"8,{dim + 1},{dim + 2}", "--methods", "lsh,pcah,itq", "--json", str(tmp_path / "o.json")]
    result = run_cli(command, timeout=120)
    assert result.returncode == 2
    line = error_line(result.stderr)
    assert line.count("supports at most") == 4 and "PCAH" in line and "ITQ" in line, line
    assert "bits: mAP@1000" not in result.stderr and not (tmp_path / "o.json").exists()  # nothing was fitted


# ------------------------------------------------------------------ evaluation arguments
def _codes_and_labels(query_width=3, db_width=3):
    rng = np.random.default_rng(0)
    return (rng.integers(0, 2, (5, 8)), rng.integers(0, 2, (20, 8)),
            rng.integers(0, 2, (5, query_width)), rng.integers(0, 2, (20, db_width)))


EVALUATION_CASES = {
    "map_top_k_2_5": (lambda: evaluation.mean_average_precision(*_codes_and_labels(), top_k=2.5),
                      r"top_k must be a positive integer or None, got 2\.5"),
    "evaluate_codes_top_k_2_5": (lambda: evaluation.evaluate_codes(*_codes_and_labels(), top_k=2.5),
                                 r"top_k must be a positive integer or None, got 2\.5"),
    "index_ties_top_k_2_5": (lambda: evaluation.mean_average_precision_index_ties(*_codes_and_labels(), top_k=2.5),
                             r"top_k must be a positive integer or None, got 2\.5"),
    "multi_hot_widths_differ": (lambda: evaluation.mean_average_precision(*_codes_and_labels(3, 4)),
                                r"multi-hot widths differ: query_labels has 3 classes, db_labels 4"),
    "multi_hot_widths_differ_evaluate_codes": (lambda: evaluation.evaluate_codes(*_codes_and_labels(5, 2)),
                                               r"multi-hot widths differ: query_labels has 5 classes, db_labels 2"),
}


@pytest.mark.parametrize("case", EVALUATION_CASES)
def test_bad_evaluation_arguments_are_one_value_error(case):
    call, message = EVALUATION_CASES[case]
    with pytest.raises(ValueError, match=message) as caught:
        call()
    assert "\n" not in str(caught.value)


def test_multi_hot_feature_sets_of_different_widths_are_a_data_error():
    rng = np.random.default_rng(0)
    feature_set = FeatureSet(rng.random((8, 4)), rng.integers(0, 2, (8, 3)), rng.random((4, 4)),
                             rng.integers(0, 2, (4, 5)))
    from tbhvae.data import validate
    with pytest.raises(DataError, match=r"train_labels \(8, 3\) and test_labels \(4, 5\) use different label"):
        validate(feature_set)


def test_first_line_drops_tf_tags_and_keeps_the_reason_at_the_end_of_a_long_line():
    from tbhvae.checks import first_line
    path = "/mnt/run/checkpoints/ckpt-15_temp/" + "x" * 300
    err = tf.errors.ResourceExhaustedError(None, None, "{{function_node __wrapped__SaveV2_dtypes_57}} "
                                           f"{path}; No space left on device\n\t [[{{{{node SaveV2}}}}]]")
    line = first_line(err, limit=200)
    assert "{{" not in line and line.startswith("/mnt/run/checkpoints") and line.endswith("No space left on device")
    assert " ... " in line and len(line) <= 205
    assert first_line(ValueError("")) == "ValueError" and first_line(ValueError("short")) == "short"


# ------------------------------------------------------------------ the command lines, as a new user misuses them
# command, arguments ({features} {run} {config} are filled in), the one error line expected. Each
# fails before any work and writes nothing, so a row costs about a second (half without TensorFlow).
MISUSE = {
    "train_bits_not_a_number": ("train", "--bits abc", r"flag --bits=abc: invalid literal"),
    "train_bits_negative": ("train", "--bits -4", r"config key 'bits' must be > 0, got -4"),
    "train_steps_zero": ("train", "--steps 0", r"config key 'steps' must be > 0, got 0"),
    "train_positional_argument": ("train", "extra", r"unexpected arguments extra; use --flag=value"),
    "train_unknown_flag": ("train", "--bitz 3", r"Unknown command line flag 'bitz'. Did you mean: bits"),
    "train_set_without_value": ("train", "--set bits", r"override 'bits': expected key=value"),
    "train_set_without_key": ("train", "--set =3", r"override '=3': unknown config key ''"),
    "train_set_two_values": ("train", "--set bits=8=9", r"override 'bits=8=9': expected a value of type int"),
    "train_set_bad_boolean": ("train", "--set tc_hinge=maybe", r"'tc_hinge=maybe': expected a boolean"),
    "train_set_negative_rate": ("train", "--set learning_rate=-1", r"'learning_rate' must be > 0, got -1.0"),
    "train_set_unknown_choice": ("train", "--set mixed_precision=fp8",
                                 r"'mixed_precision' must be one of float32, mixed_float16, mixed_bfloat16"),
    "train_set_zero_queries": ("train", "--set eval_queries=0", r"'eval_queries' must be > 0, got 0"),
    "train_set_anchors_below_neighbours": ("train", "--set anchors=1",
                                           r"'nearest_anchors' must be <= anchors \(1\), got 2"),
    "train_config_missing": ("train", "--config /nonexistent/c.py",
                             r"config file /nonexistent/c.py not found; give a path or the name of a shipped"),
    "train_config_syntax_error": ("train", "--config {config}/syntax.py", r"syntax.py: SyntaxError"),
    "train_config_returns_int": ("train", "--config {config}/five.py", r"get_config\(\) returned int, not Config"),
    "train_config_without_get_config": ("train", "--config {config}/empty.py",
                                        r"a config file must define get_config\(\) -> tbhvae.config.Config"),
    "train_config_raises": ("train", "--config {config}/raises.py",
                            r"raises.py: RuntimeError: no dataset here; fix the config file"),
    "train_features_missing": ("train", "--features /nonexistent.npz", r"/nonexistent.npz: feature file not found"),
    "train_features_a_directory": ("train", "--features {config}", r"is a directory, not a feature file"),
    "train_features_not_npz": ("train", "--features {config}/five.py", r"five.py: not a readable .npz file"),
    "train_unknown_strategy": ("train", "--strategy nonsense", r"flag --strategy=nonsense: value should be one of"),
    "train_model_dir_a_file": ("train", "--model_dir {config}/five.py", r"five.py is a file; pass a directory"),
    "export_run_missing": ("export", "--model_dir /nonexistent --out {config}/o", r"/nonexistent: no such directory"),
    "export_not_a_run": ("export", "--model_dir {config} --out {config}/o", r"not a training run \(no config.json\)"),
    "export_without_run": ("export", "--out {config}/o", r"Flag --model_dir must have a value"),
    "export_out_a_file": ("export", "--model_dir {run} --out {config}/five.py", r"--out \S+five.py: is a file"),
    "export_negative_parity_rows": ("export", "--model_dir {run} --out {config}/o --parity_examples -1",
                                    r"flag --parity_examples=-1: -1 is not a non-negative integer"),
    "export_name_with_a_slash": ("export", "--model_dir {run} --out {config}/o --name a/b",
                                 r"--name 'a/b': must be a plain directory name"),
    "export_unknown_signature": ("export", "--model_dir {run} --out {config}/o --serving_default pixels",
                                 r"flag --serving_default=pixels: value should be one of <features\|images>"),
    "baselines_zero_bits": ("baselines", "--features {features} --bits 0 --json {config}/o.json",
                            r"--bits: expected comma-separated positive integers, got '0'"),
    "baselines_bits_not_a_number": ("baselines", "--features {features} --bits 8,x --json {config}/o.json",
                                    r"got '8,x'"),
    "baselines_unknown_method": ("baselines", "--features {features} --methods itq,foo --json {config}/o.json",
                                 r"methods: unknown foo; choose from lsh,"),
    "baselines_features_missing": ("baselines", "--features /nonexistent.npz --json {config}/o.json",
                                   r"feature file not found"),
    "retrieval_unknown_command": ("retrieval", "frobnicate --encoder {run} --index {config}/i.npz",
                                  r"usage: python -m tbhvae.cli.retrieval build\|query .*\(got 'frobnicate'\)"),
    "retrieval_no_command": ("retrieval", "", r"usage: .*\(no command given\)"),
    "retrieval_without_index": ("retrieval", "query --encoder {run}", r"query needs --index"),
    "retrieval_figure_without_images": ("retrieval", "query --encoder {run} --index i.npz --figure f.png",
                                        r"--figure/--logdir need --images"),
    "retrieval_zero_k": ("retrieval", "query --encoder {run} --index i.npz --k 0", r"flag --k=0: 0 is not a positive"),
    "retrieval_negative_queries": ("retrieval", "query --encoder {run} --index i.npz --queries -3",
                                   r"flag --queries=-3: -3 is not a non-negative integer"),
    "serve_port_out_of_range": ("serve", "--encoder {run} --index i.npz --port 99999",
                                r"flag --port=99999: 99999 is not an integer in the range \[1, 65535\]"),
}


@pytest.fixture(scope="module")
def misuse_files(tmp_path_factory):
    """A folder of wrong things: a config with a syntax error, one returning 5, one without get_config,
    one whose get_config raises."""
    folder = tmp_path_factory.mktemp("misuse")
    (folder / "raises.py").write_text("def get_config():\n    raise RuntimeError('no dataset here')\n")
    (folder / "syntax.py").write_text("def get_config(:\n")
    (folder / "five.py").write_text("def get_config():\n    return 5\n")
    (folder / "empty.py").write_text("x = 1\n")
    return folder


@pytest.mark.parametrize("case", MISUSE)
def test_command_line_misuse_is_one_line_naming_the_problem_and_writes_nothing(case, tiny, misuse_files, tmp_path):
    command, arguments, expected = MISUSE[case]
    arguments = arguments.format(features=tiny["features"], run=tiny["run"], config=misuse_files).split()
    if command == "train":  # a valid command but for the misuse
        defaults = {"--config": "cifar10_tbhvae", "--features": str(tiny["features"]),
                    "--model_dir": str(tmp_path / "run")}
        arguments += [arg for flag, value in defaults.items() if flag not in arguments for arg in (flag, value)]
    before = {folder: hashes(folder) for folder in (misuse_files, tiny["run"], tmp_path)}
    result = subprocess.run([sys.executable, "-m", f"tbhvae.cli.{command}", *arguments], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 2, result.stderr[-2000:]
    line = error_line(result.stderr)
    assert re.search(expected, line), line
    assert {folder: hashes(folder) for folder in before} == before
