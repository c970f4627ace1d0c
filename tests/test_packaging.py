"""The wheel installs one top-level package, ``blockferry``, with the actors and plugins inside
it and the plugins registered as entry points; ``engine``/``plugins`` are never importable."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_in_a_fresh_virtualenv(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dist), str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("blockferry-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"blockferry", "blockferry-0.1.0.dist-info"}, tops
    # every module of the three source folders, subpackages included, is in the wheel
    for folder, prefix in ((ROOT / "engine", "blockferry"), (ROOT / "actors", "blockferry/actors"),
                           (ROOT / "plugins", "blockferry/plugins")):
        for src in folder.rglob("*.py"):
            assert f"{prefix}/{src.relative_to(folder).as_posix()}" in names, src
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert all(f"[{g}]" in entry_points for g in ("blockferry.sources", "blockferry.backends", "blockferry.storage"))

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True, timeout=120)
    # dependencies come from the test environment; the package itself only from the wheel
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"] + os.pathsep + sysconfig.get_paths()["platlib"]}
    probe = (
        "import blockferry, blockferry.actors.server, blockferry.plugins.local, blockferry.registry as r\n"
        "print(blockferry.__file__)\n"
        "print(type(r.source_plugin('x.img')).__name__, type(r.backend_plugin('/srv/repo')).__name__)\n"
        "from importlib.metadata import entry_points as e\n"
        "print(sorted(x.value for g in (r.SOURCES, r.BACKENDS, r.STORAGE) for x in e(group=g)))\n"
        "for name in ('engine', 'plugins', 'actors'):\n"
        "    try:\n"
        "        __import__(name)\n"
        "    except ImportError:\n"
        "        print('no', name)\n"
    )
    out = subprocess.run([str(py), "-c", probe], check=True, capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=120).stdout.split("\n")
    assert out[0].startswith(str(venv)), out
    assert out[1] == "FileSourcePlugin LocalBackendPlugin"
    assert out[2] == str(sorted(["blockferry.plugins.aws:EbsSourcePlugin", "blockferry.plugins.aws:Ec2SourcePlugin",
                                 "blockferry.plugins.file_source:FileSourcePlugin",
                                 "blockferry.plugins.local:LocalBackendPlugin",
                                 "blockferry.plugins.qemu:QemuSourcePlugin",
                                 "blockferry.plugins.rbd:RbdSourcePlugin",
                                 "blockferry.plugins.rbd:RbdStoragePlugin",
                                 "blockferry.plugins.s3:S3BackendPlugin",
                                 "blockferry.plugins.vsphere:VSphereSourcePlugin"]))
    assert out[3:6] == ["no engine", "no plugins", "no actors"]
    version = subprocess.run([str(venv / "bin" / "blockferry"), "--version"], check=True, capture_output=True,
                             text=True, env=env, timeout=60).stdout
    assert version.strip() == "blockferry 0.1.0"
