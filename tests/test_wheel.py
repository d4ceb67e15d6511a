"""The package as a user installs it: a wheel built from this checkout, installed into a fresh
virtual environment, used from directories that are not the checkout.

The fresh environment gets the test environment's third-party packages (torch, transformers...)
through a ``.pth`` line, so nothing is downloaded; ``weightcast`` itself comes from the wheel
(asserted: every module is imported from the new environment's site-packages). A line in a
``.pth`` file only extends ``sys.path``: the ``.pth`` files of the shared site-packages, among
them the editable install of the checkout, are not run.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+ (tomllib)")

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(600)


class Env:
    """The fresh environment: its python, its site-packages, the wheel it was given."""

    def __init__(self, root: Path, wheel: Path) -> None:
        self.root, self.wheel = root, wheel
        self.python = root / "bin" / "python"
        self.cli = root / "bin" / "weightcast"
        self.site = Path(_run([str(self.python), "-c", "import sysconfig; "
                               "print(sysconfig.get_paths()['purelib'])"]).stdout.strip())

    def run(self, *argv: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
        return _run(list(argv), cwd=cwd, timeout=timeout, check=False)


def _run(argv: list[str], cwd: Path | None = None, timeout: float = 300,
         check: bool = True) -> subprocess.CompletedProcess:
    """Run without the checkout on the path (no PYTHONPATH), offline for huggingface_hub."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, (argv, proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


def _packaged_sources(dest: Path) -> Path:
    """Copy what the wheel is built from (pyproject, readme, the mapped package folders) to
    ``dest``, so the build writes its build/ and *.egg-info there, not into the checkout."""
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    folders = {"weightcast", *meta["tool"]["setuptools"]["package-dir"].values()}
    dest.mkdir()
    for name in ("pyproject.toml", meta["project"]["readme"]):
        shutil.copy2(REPO / name, dest / name)
    for folder in sorted(folders):
        shutil.copytree(REPO / folder, dest / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def _build_isolation_args() -> list[str]:
    """Build with this environment's setuptools when it can build wheels by itself (>= 70.1),
    else let pip fetch the build requirements (an isolated build, as a user's pip does)."""
    try:
        import setuptools
        major, minor = (int(p) for p in setuptools.__version__.split(".")[:2])
    except (ImportError, ValueError):
        return []
    return ["--no-build-isolation"] if (major, minor) >= (70, 1) else []


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    top = tmp_path_factory.mktemp("wheel")
    src = _packaged_sources(top / "src")
    dist = top / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", *_build_isolation_args(), "-q",
          "-w", str(dist), str(src)], timeout=300)
    (wheel,) = dist.glob("weightcast-*.whl")
    root = top / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(root)])
    fresh = Env(root, wheel)
    shared = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (fresh.site / "_test_shared_site.pth").write_text("".join(p + "\n" for p in shared))
    _run([sys.executable, "-m", "pip", "--python", str(fresh.python), "install", "-q",
          "--no-deps", "--no-index", str(wheel)], timeout=300)
    return fresh


@pytest.fixture
def outside(tmp_path) -> Path:
    """A working directory outside the checkout."""
    assert not str(tmp_path).startswith(str(REPO))
    return tmp_path


def test_wheel_holds_only_the_weightcast_package(env):
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    names = zipfile.ZipFile(env.wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"weightcast", f"weightcast-{version}.dist-info"}
    for module in ("orchestrator/planner.py", "workers/api.py", "launch/cli.py",
                   "cluster_configs/__init__.py", "cluster_configs/16x8-h100.yaml"):
        assert f"weightcast/{module}" in names, module
    assert not [n for n in names if "benchmarks" in n or n.startswith("weightcast/tests")]
    installed = {p.name for p in env.site.iterdir()} - {"__pycache__", "_test_shared_site.pth"}
    assert installed == {"weightcast", f"weightcast-{version}.dist-info"}, installed


def test_modules_come_from_the_wheel(env, outside):
    code = ("import json, weightcast, weightcast.workers.api as a, weightcast.launch.cli as c, "
            "weightcast.orchestrator.planner as p, weightcast.cluster_configs as cc; "
            "print(json.dumps([weightcast.__version__, weightcast.__file__, a.__file__, c.__file__, "
            "p.__file__, cc.path('16x8-h100')]))")
    version, *files = json.loads(env.run(str(env.python), "-c", code, cwd=outside).stdout)
    assert version == tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    for f in files:
        assert Path(f).is_relative_to(env.site / "weightcast"), f


def test_cli_help_and_demo(env, outside):
    proc = env.run(str(env.cli), "--help", cwd=outside)
    assert proc.returncode == 0 and "plan" in proc.stdout and "demo" in proc.stdout, proc.stderr
    proc = env.run(str(env.cli), "demo", cwd=outside, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("identical to safetensors.load_file") == 2, proc.stdout[-3000:]
    assert (outside / "demo_checkpoint" / "config.json").is_file()


def test_public_names_beside_a_users_own_workers_package(env, outside):
    """A project with its own top-level ``workers`` package (Celery's convention) first on
    sys.path: the public names still resolve, and ``workers`` stays the user's."""
    (outside / "workers").mkdir()
    (outside / "workers" / "__init__.py").write_text("OWNER = 'the user'\n")
    code = ("import json, workers, weightcast as wc\n"
            "names = ['load_pretrained', 'save_pretrained', 'DeviceMapError', 'load_on_ray']\n"
            "got = {n: getattr(wc, n).__module__ for n in names}\n"
            "import workers as again\n"
            "unresolved = [n for n in wc.__all__ if not hasattr(wc, n)]\n"
            "print(json.dumps({'got': got, 'torch': hasattr(wc, 'torch'), 'owner': again.OWNER,\n"
            "                  'all': sorted(wc.__all__), 'unresolved': unresolved}))")
    proc = env.run(str(env.python), "-c", code, cwd=outside)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["got"] == {"load_pretrained": "weightcast.workers.api",
                          "save_pretrained": "weightcast.workers.save",
                          "DeviceMapError": "weightcast.orchestrator.errors",
                          "load_on_ray": "weightcast.launch.ray"}
    assert out["torch"] is False and out["owner"] == "the user" and out["unresolved"] == []
    assert {"load_pretrained", "save_pretrained", "load_on_ray", "DeviceMapError"} <= set(out["all"])


@pytest.mark.parametrize("command", ["bench", "emulate"])
def test_harness_commands_outside_a_checkout_exit_2(env, outside, command):
    proc = env.run(str(env.cli), command, cwd=outside)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "not installed with the package" in proc.stderr and "make bench" in proc.stderr
    assert proc.stderr.startswith(f"weightcast {command}: error: ")


def test_plan_finds_a_shipped_cluster_by_name(env, outside):
    ckpt = outside / "ckpt"
    proc = env.run(str(env.cli), "synth", str(ckpt), "--like", "tiny", cwd=outside)
    assert proc.returncode == 0, proc.stderr
    proc = env.run(str(env.cli), "plan", str(ckpt), "--cluster", "16x8-h100", "--json", cwd=outside)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(proc.stdout)
    assert (plan["cluster"], plan["world_size"], plan["nodes"]) == ("16x8-h100", 128, 16)
    assert plan["total_read_bytes"] == plan["checkpoint_bytes"] > 0
    proc = env.run(str(env.cli), "plan", str(ckpt), "--cluster", "16x8-a100", cwd=outside)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "Cluster file not found" in proc.stderr and "16x8-h100, 1x8-h100" in proc.stderr
