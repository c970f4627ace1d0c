"""The vSphere API simulator (govmomi's, around tests/plugins/vsphere/vcsim/main.go), built once
into a cache directory and started on loopback once per test session."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from blockferry.plugins.vsphere.source import PASSWORD_ENV

from tests.plugins.vsphere.vsim import SimClient

HERE = Path(__file__).resolve().parent
MAIN = HERE / "vcsim" / "main.go"
#: Debian's golang-github-vmware-govmomi-dev puts the source here (scripts/system-packages)
GOPATH = Path("/usr/share/gocode")
GOVMOMI = GOPATH / "src" / "github.com" / "vmware" / "govmomi" / "simulator"


@dataclass
class Simulator:
    host: str
    port: int
    user: str
    password: str

    def url(self, vm: str, *, user: bool = True) -> str:
        who = f"{self.user}@" if user else ""
        return f"vsphere://{who}{self.host}:{self.port}/{vm}?protocol=http"


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "blockferry-tests"


def cached_binary(source: bytes, go_version: str) -> Path:
    """Where the build of ``source`` by that Go is cached: a new source, a new build."""
    key = hashlib.sha256(source + go_version.encode()).hexdigest()[:16]
    return _cache_dir() / f"vcsim-{key}" / "vcsim"


def build_simulator() -> Path:
    """The simulator's binary, built from main.go unless a build of the same source (and Go
    version) is cached. Fails, never skips, when Go or govmomi's source is missing."""
    go = shutil.which("go")
    if go is None:
        pytest.fail("the vSphere simulator needs Go: run scripts/system-packages (installs golang-go)")
    if not GOVMOMI.is_dir():
        pytest.fail(f"the vSphere simulator needs govmomi's source in {GOVMOMI}: run scripts/system-packages "
                    "(installs golang-github-vmware-govmomi-dev)")
    version = subprocess.run([go, "version"], capture_output=True, text=True, check=True).stdout
    binary = cached_binary(MAIN.read_bytes(), version)
    if binary.exists():
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_name(f"vcsim.{os.getpid()}")
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": str(GOPATH)}
    env.setdefault("GOCACHE", str(_cache_dir() / "go-build"))  # Go needs one; HOME may be unset
    r = subprocess.run([go, "build", "-o", str(tmp), str(MAIN)], capture_output=True, text=True, env=env,
                       cwd=MAIN.parent, timeout=600)
    if r.returncode:
        pytest.fail(f"building the vSphere simulator failed:\n{r.stdout}{r.stderr}")
    os.replace(tmp, binary)  # atomic: a concurrent session sees a whole binary or none
    return binary


@pytest.fixture(scope="session")
def vcsim() -> Iterator[Simulator]:
    """A simulated vCenter (one datacenter, a cluster, hosts, 6 VMs of one disk each, datastore
    LocalDS_0) on 127.0.0.1, login backup/s3cret, plain HTTP. Stopped (by its own pid) at the end."""
    binary = build_simulator()
    workdir = tempfile.mkdtemp(prefix="blockferry-vcsim-")  # the datastores' files go under TMPDIR
    log = Path(workdir) / "vcsim.log"  # its panics, if any, go there
    with open(log, "wb") as err:
        proc = subprocess.Popen([str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                text=True, env={**os.environ, "TMPDIR": workdir})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()  # printed once it listens
        if not line:
            pytest.fail(f"the vSphere simulator exited with {proc.wait(timeout=10)} before serving:\n"
                        f"{log.read_text(errors='replace')[-2000:]}")
        u = urlsplit(line)
        assert u.hostname and u.port and u.username and u.password, line
        yield Simulator(host=u.hostname, port=u.port, user=u.username, password=u.password)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()  # main.go returns when its standard input closes
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if "panic" in log.read_text(errors="replace"):  # a request crashed the simulator: show why
            print(f"the vSphere simulator panicked:\n{log.read_text(errors='replace')[-4000:]}", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def sim(vcsim: Simulator) -> Iterator[SimClient]:
    """The tests' own client of the simulator (to prepare VMs and look at their snapshots)."""
    client = SimClient(vcsim.host, vcsim.port, vcsim.user, vcsim.password)
    yield client
    client.close()


@pytest.fixture(autouse=True)
def password(vcsim: Simulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plugin's password, from the environment as a user would give it."""
    monkeypatch.setenv(PASSWORD_ENV, vcsim.password)
