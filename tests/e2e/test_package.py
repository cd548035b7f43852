"""The release wheel: built offline from this checkout, it holds the plugin and nothing else, twine accepts it, and
the quickstart trains with only the wheel installed, from a folder outside the repository.

`pip install <wheel>[peft]` brings the wheel's dependencies (torch, trl, transformers, accelerate, datasets, ...) and
peft; they are already in this test's environment, so the wheel is installed with `--no-deps --no-index` into a
folder of its own, and the quickstart runs on that folder plus this environment's site-packages, read without their
.pth files (`python -S`), so that the checkout's editable installs (trl_gspo, gspo_examples, gspo_benchmarks) are not
importable. Nothing is downloaded: the wheel is built with this environment's setuptools (no build isolation).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from packaging.version import Version

import trl_gspo

ROOT = Path(__file__).resolve().parents[2]
# `license` as an SPDX expression with `license-files` (pyproject.toml) needs this setuptools.
MIN_SETUPTOOLS = Version("77")
QUICKSTART_STEPS = 3


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, f"`{' '.join(argv)}` failed:\n{result.stdout[-3000:]}\n{result.stderr[-4000:]}"
    return result


def checkout_files() -> list[str]:
    """The files a clone has, plus new ones not ignored by git: what the release is built from."""
    listed = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT).stdout
    return [name for name in listed.split("\0") if name and (ROOT / name).is_file()]


def build_wheel(files: list[str], tmp_path: Path) -> Path:
    setuptools_version = Version(importlib.metadata.version("setuptools"))
    assert setuptools_version >= MIN_SETUPTOOLS, f"setuptools {setuptools_version} builds no wheel of this project"
    source = tmp_path / "source"
    for name in files:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index", "--no-build-isolation"]
    run([*pip_wheel, "--wheel-dir", str(wheels), str(source)])
    (wheel,) = wheels.glob("*.whl")
    return wheel


@pytest.mark.slow
def test_wheel_holds_the_plugin_passes_twine_and_runs_the_quickstart_outside_the_checkout(tmp_path):
    assert importlib.util.find_spec("twine"), "twine is in the dev extra: `make install` installs it"
    files = checkout_files()
    wheel = build_wheel(files, tmp_path)

    dist_info = f"trl_gspo-{trl_gspo.__version__}.dist-info"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(f"{dist_info}/METADATA").decode()
        license_text = archive.read(f"{dist_info}/licenses/LICENSE")
    plugin_sources = {name for name in files if name.startswith("trl_gspo/") and name.endswith(".py")}
    assert "trl_gspo/tiny.py" in plugin_sources
    assert {name for name in names if not name.startswith(f"{dist_info}/")} == plugin_sources
    assert license_text == (ROOT / "LICENSE").read_bytes()
    assert f"\nVersion: {trl_gspo.__version__}\n" in metadata
    assert "\nLicense-Expression: Apache-2.0\n" in metadata

    run([sys.executable, "-m", "twine", "check", "--strict", str(wheel)])

    site = tmp_path / "site"
    run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site), str(wheel)])
    outside = tmp_path / "user"
    outside.mkdir()
    assert not outside.is_relative_to(ROOT)
    shutil.copy2(ROOT / "scripts" / "quickstart.py", outside / "quickstart.py")
    dependencies = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(
        PYTHONPATH=os.pathsep.join([str(site), *dependencies]),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
    )
    python = [sys.executable, "-S"]  # -S: no .pth files, so no editable install of the checkout

    where = "import importlib.util as u; print(u.find_spec('trl_gspo').origin); print(u.find_spec('gspo_examples'))"
    origin, examples = run([*python, "-c", where], cwd=outside, env=env).stdout.split()
    assert Path(origin).is_relative_to(site), origin
    assert examples == "None"

    quickstart = [*python, "quickstart.py", "--max-steps", str(QUICKSTART_STEPS), "--output-dir", "run"]
    result = run(quickstart, cwd=outside, env=env)
    assert f"quickstart: {QUICKSTART_STEPS} GSPO steps done" in result.stdout, result.stdout[-2000:]
