"""The commands as a new user meets them: --help of every console script, configs by name from anywhere."""
import configparser
import importlib
import subprocess
import sys

import pytest
import setuptools

from conftest import REPO_ROOT
from tbhvae.config import ConfigError, load_config, shipped_configs

COMMANDS = ("train", "export", "baselines", "extract", "retrieval", "serve")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_console_script_help_gives_its_description_and_flags(command):
    module = importlib.import_module(f"tbhvae.cli.{command}")
    # as the console-script launcher runs it: a __main__ without a docstring of its own
    launcher = f"import sys; sys.argv = ['tbhvae-{command}', '--help']; from tbhvae.cli.{command} import run; run()"
    result = subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True, timeout=300)
    assert module.__doc__.strip().splitlines()[0] in result.stdout, result.stderr
    assert "  --" in result.stdout  # the command's own flags are listed


# The module forms the issues and README name: python -m tbhvae.baselines / tbhvae.retrieval / tbhvae.serve,
# and the bench table run as a script from another directory.
MODULE_FORMS = (["-m", "tbhvae.baselines"], ["-m", "tbhvae.retrieval"], ["-m", "tbhvae.serve"],
                [str(REPO_ROOT / "bench" / "table.py")])


@pytest.mark.parametrize("form", MODULE_FORMS, ids=lambda form: form[-1].rsplit("/", 1)[-1])
def test_module_and_script_forms_run_their_command(form, tmp_path):
    result = subprocess.run([sys.executable, *form, "--help"], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert "Traceback" not in result.stderr, result.stderr  # (absl's --help exits 1; argparse's 0)
    assert "  --features" in result.stdout or "  --encoder" in result.stdout, result.stdout  # its own flags


def test_shipped_configs_load_by_name_from_any_directory(tmp_path):
    shipped = shipped_configs()
    assert {"cifar10_tbh", "cifar10_tbhvae", "cifar10_tbhvae_paper", "cifar10_tbh_reference"} <= set(shipped)
    for name, path in shipped.items():
        assert path.parent == REPO_ROOT / "configs"
        assert load_config(name) == load_config(REPO_ROOT / "configs" / f"{name}.py"), name
    printed = subprocess.run([sys.executable, "-m", "tbhvae.cli.train", "--config", "cifar10_tbh", "--print_config"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert printed.returncode == 0, printed.stderr
    assert '"name": "cifar10_tbh"' in printed.stdout


def test_an_unknown_config_name_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match=r"not found; give a path or the name of a shipped config \(.*cifar10_tbh,"):
        load_config("cifar10_tbhh")
    with pytest.raises(ConfigError, match="not found"):
        load_config("somewhere/cifar10_tbh")  # a path is never looked up by name


def test_setup_cfg_lists_every_package_of_the_tree():
    parser = configparser.ConfigParser()
    parser.read(REPO_ROOT / "setup.cfg")
    listed = parser["options"]["packages"].split()
    found = setuptools.find_packages(str(REPO_ROOT), include=["tbhvae", "tbhvae.*"])
    assert sorted(listed) == sorted(found + ["tbhvae.configs"])
    assert parser["options"]["package_dir"].split() == ["tbhvae.configs", "=", "configs"]


def test_a_source_checkout_without_install_finds_the_configs_folder(monkeypatch):
    import importlib.resources

    def not_installed(name):
        raise ModuleNotFoundError(f"No module named '{name}'")

    monkeypatch.setattr(importlib.resources, "files", not_installed)
    assert shipped_configs()["cifar10_tbhvae"] == REPO_ROOT / "configs" / "cifar10_tbhvae.py"


def test_tensorflow_start_up_noise_is_dropped_and_everything_else_kept(capfd):
    import os
    import re

    from tbhvae import cli
    from tbhvae.stderr import stderr_without

    with stderr_without(re.compile("|".join(cli._STARTUP_NOISE + cli._NO_GPU_NOISE))):
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
                    b"I0000 00:00:1 port.cc:153] oneDNN custom operations are on. You may see ...\n"
                    b"E0000 00:00:1 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error\n"
                    b"W0000 00:00:1 something.cc:1] a real warning\n")
        print("from python", file=sys.stderr)
    err = capfd.readouterr().err
    assert sorted(err.splitlines()) == ["W0000 00:00:1 something.cc:1] a real warning", "from python"]


def test_commands_start_tensorflow_without_its_noise(tmp_path):
    """A real start: the noise TensorFlow prints when imported plainly is gone through start_tensorflow."""
    plain = subprocess.run([sys.executable, "-c", "import tensorflow as tf; tf.config.list_physical_devices()"],
                           capture_output=True, text=True, timeout=300)
    if "absl::InitializeLog" not in plain.stderr and "oneDNN" not in plain.stderr:
        pytest.skip("this TensorFlow prints no start-up noise")
    started = subprocess.run([sys.executable, "-c", "from tbhvae.cli import start_tensorflow; start_tensorflow()"],
                             capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert started.returncode == 0
    for noise in ("absl::InitializeLog", "oneDNN custom operations", "compiler flags"):
        assert noise not in started.stderr, started.stderr
