"""A real S3 server for tests: a one-node Ceph cluster (monitor, memstore OSD, radosgw) on loopback.

Follows ../shared/recipes/ceph-loopback.md. Everything lives in a scratch directory; ports are
picked free so that several clusters (other test runs on the machine) do not collide. Every daemon
is stopped by its pid, always. Missing Ceph packages are an error, not a skip: ``make setup``
(scripts/system-packages) installs them.

Extra storage class: the zonegroup and zone placement get a second storage class (``ARCHIVE``,
its own data pool), so that tests can place objects in a non-STANDARD class.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

ACCESS_KEY = "BFTESTACCESSKEY00001"
SECRET_KEY = "bfTestSecretKey/DoNotLog+0123456789abcdef"
ARCHIVE_CLASS = "ARCHIVE"
NEEDED = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "monmaptool", "ceph")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RadosGW:
    """``start()`` then ``endpoint``/``env()``; ``stop()`` kills every daemon by pid."""

    def __init__(self, root: Path, *, memstore_bytes: int = 1536 << 20, usage_log: bool = False) -> None:
        missing = [b for b in NEEDED if shutil.which(b) is None]
        if missing:
            raise RuntimeError(
                f"Ceph is not installed ({', '.join(missing)} missing): run scripts/system-packages "
                "(it installs ceph-mon ceph-osd radosgw ceph-common); the S3 tests need a real radosgw"
            )
        self.root = root
        self.memstore_bytes = memstore_bytes
        #: radosgw counts requests per bucket and kind (``radosgw-admin usage show``): the benchmark's
        #: request figures, measured by the server itself
        self.usage_log = usage_log
        self.port = _free_port()
        self.mon_ports = (_free_port(), _free_port())
        self.conf = root / "ceph.conf"
        self.run = root / "run"
        self.pids: list[int] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point a client at this server."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_DEFAULT_REGION": "default", "AWS_ENDPOINT_URL": self.endpoint}

    def _ceph(self, *args: str, timeout: float = 60) -> str:
        r = subprocess.run([*args, "-c", str(self.conf)], capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
        return r.stdout

    def _write_conf(self, fsid: str) -> None:
        r = self.root
        v2, v1 = self.mon_ports
        self.conf.write_text(f"""[global]
fsid = {fsid}
mon host = [v2:127.0.0.1:{v2},v1:127.0.0.1:{v1}]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
public network = 127.0.0.0/8
auth cluster required = none
auth service required = none
auth client required = none
ms mon client mode = crc
keyring = /dev/null
run dir = {self.run}
pid file = {self.run}/$cluster-$name.pid
log file = {r}/log/$cluster-$name.log
admin socket = {self.run}/$cluster-$name.asok
mon data = {r}/mon/$cluster-$id
osd data = {r}/osd/$cluster-$id
mon allow pool size one = true
mon allow pool delete = true
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
mon data avail warn = 2
mon data avail crit = 1
mon max pg per osd = 1000

[osd]
osd objectstore = memstore
memstore device bytes = {self.memstore_bytes}
osd op num threads per shard = 1

[client]
admin socket = {self.run}/$cluster-$name.$pid.asok

[client.rgw.test]
rgw frontends = beast endpoint=127.0.0.1:{self.port} tcp_nodelay=1
rgw gc obj min wait = 0
rgw gc processor period = 10
rgw dns name = 127.0.0.1
rgw thread pool size = 64
""" + ("""rgw enable usage log = true
rgw usage log tick interval = 1
rgw usage log flush threshold = 1
""" if self.usage_log else ""))

    def _wait(self, what: str, check: object, timeout: float) -> None:
        end = time.monotonic() + timeout
        while True:
            try:
                if check():  # type: ignore[operator]
                    return
            except Exception:
                pass
            if time.monotonic() > end:
                raise RuntimeError(f"radosgw fixture: {what} not ready after {timeout:.0f} s (logs in {self.root}/log)")
            time.sleep(0.2)

    def _collect_pid(self, name: str) -> None:
        pidfile = self.run / f"ceph-{name}.pid"
        self._wait(f"pid file of {name}", pidfile.exists, 30)
        self._wait(f"pid of {name}", lambda: pidfile.read_text().strip().isdigit(), 5)
        self.pids.append(int(pidfile.read_text().strip()))

    def start(self) -> None:
        for d in ("run", "log", "mon/ceph-a", "osd/ceph-0"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        fsid = str(uuid.uuid4())
        self._write_conf(fsid)
        v2, v1 = self.mon_ports
        monmap = str(self.root / "monmap")
        subprocess.run(["monmaptool", "--create", "--enable-all-features", "--addv", "a",
                        f"[v2:127.0.0.1:{v2},v1:127.0.0.1:{v1}]", "--fsid", fsid, monmap],
                       check=True, capture_output=True)
        self._ceph("ceph-mon", "--mkfs", "-i", "a", "--monmap", monmap)
        self._ceph("ceph-mon", "-i", "a")
        self._collect_pid("mon.a")
        self._wait("monitor", lambda: self._ceph("ceph", "-s", "--connect-timeout", "5", timeout=10), 30)
        osd_uuid = str(uuid.uuid4())
        osd_id = self._ceph("ceph", "osd", "new", osd_uuid).strip()
        self._ceph("ceph-osd", "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid)
        self._ceph("ceph-osd", "-i", osd_id)
        self._collect_pid(f"osd.{osd_id}")
        self._wait("OSD", lambda: "1 up" in self._ceph("ceph", "osd", "stat"), 60)
        self._ceph("radosgw", "-n", "client.rgw.test")
        self._collect_pid("client.rgw.test")
        self._wait("radosgw", self._http_ok, 90)
        # the archive storage class: its own pool, in the zonegroup's and the zone's placement.
        # radosgw creates the default zonegroup and zone on its first start, so the class is
        # added then and radosgw restarted to load it
        self._ceph("ceph", "osd", "pool", "create", "default.rgw.archive.data", "8", "8")
        self._ceph("ceph", "osd", "pool", "application", "enable", "default.rgw.archive.data", "rgw")
        self._ceph("radosgw-admin", "zonegroup", "placement", "add", "--rgw-zonegroup", "default",
                   "--placement-id", "default-placement", "--storage-class", ARCHIVE_CLASS)
        self._ceph("radosgw-admin", "zone", "placement", "add", "--rgw-zone", "default",
                   "--placement-id", "default-placement", "--storage-class", ARCHIVE_CLASS,
                   "--data-pool", "default.rgw.archive.data")
        self._stop_pid(self.pids.pop())
        (self.run / "ceph-client.rgw.test.pid").unlink(missing_ok=True)
        self._ceph("radosgw", "-n", "client.rgw.test")
        self._collect_pid("client.rgw.test")
        self._wait("radosgw", self._http_ok, 90)
        self._ceph("radosgw-admin", "user", "create", "--uid", "blockferry", "--display-name", "blockferry tests",
                   "--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY)

    def usage(self) -> dict[str, dict[str, int]]:
        """Requests so far, ``{bucket: {category: ops}}`` (needs ``usage_log``)."""
        import json

        out: dict[str, dict[str, int]] = {}
        data = json.loads(self._ceph("radosgw-admin", "usage", "show", "--uid", "blockferry", "--show-log-sum=false"))
        for entry in data.get("entries", []):
            for b in entry.get("buckets", []):
                cats = out.setdefault(b.get("bucket", ""), {})
                for c in b.get("categories", []):
                    cats[c["category"]] = cats.get(c["category"], 0) + c["ops"]
        return out

    def remove_bucket(self, bucket: str) -> None:
        """Delete a bucket and every object in it (the benchmark's cleanup between runs)."""
        self._ceph("radosgw-admin", "bucket", "rm", "--bucket", bucket, "--purge-objects", timeout=300)

    def collect_garbage(self) -> None:
        """Free the data of deleted objects now. radosgw deletes the tails of large objects
        later, in its garbage collection: a minute after a full backup's bucket was removed, 175
        tails were still waiting, and in two benchmark runs the third repetition's full backup
        took 15 s against 8-11 s in the first two."""
        self._ceph("radosgw-admin", "gc", "process", "--include-all", timeout=300)

    def _http_ok(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint, timeout=2) as r:
                return r.status == 200
        except urllib.error.HTTPError as exc:
            return exc.code < 500
        except OSError:
            return False

    def _stop_pid(self, pid: int, timeout: float = 20) -> None:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        """Stop every daemon by pid and wait for it (the OSD takes a few seconds)."""
        for pid in reversed(self.pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        end = time.monotonic() + 20
        for pid in self.pids:
            while time.monotonic() < end:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.pids.clear()


class RbdPool:
    """An RBD pool of a running test cluster, with the ``rbd`` commands the RBD tests need."""

    def __init__(self, conf: Path, name: str) -> None:
        self.conf = conf
        self.name = name

    def run(self, *args: str, binary: str = "rbd", input: bytes | None = None) -> bytes:
        r = subprocess.run([binary, "-c", str(self.conf), *args], capture_output=True, input=input, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"{binary} {' '.join(args)} failed ({r.returncode}): {r.stderr.decode()[-2000:]}")
        return r.stdout

    def create(self) -> None:
        self.run("osd", "pool", "create", self.name, "8", "8", binary="ceph")
        self.run("pool", "init", self.name)

    def url(self, image: str) -> str:
        """The source URL of an image of this pool."""
        return f"rbd://{self.name}/{image}?conf={self.conf}"

    @property
    def system_url(self) -> str:
        return f"rbd://{self.name}?conf={self.conf}"

    def snapshots(self, image: str) -> list[str]:
        return [s["name"] for s in json.loads(self.run("snap", "ls", "--format", "json", f"{self.name}/{image}"))]

    def diff(self, image: str, from_snap: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = json.loads(self.run("diff", "--format", "json", "--from-snap", from_snap,
                                                        f"{self.name}/{image}"))
        return out

    def export(self, image: str) -> bytes:
        return self.run("export", "--no-progress", f"{self.name}/{image}", "-")

    def write(self, image: str, offset: int, data: bytes, scratch: Path) -> None:
        """Write ``data`` at ``offset`` into the image through QEMU's rbd driver (qemu-io)."""
        src = scratch / f"write-{offset}.bin"
        src.write_bytes(data)
        target = {"driver": "raw", "file": {"driver": "rbd", "pool": self.name, "image": image, "conf": str(self.conf)}}
        r = subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -s {src} {offset} {len(data)}",
                            "json:" + json.dumps(target)], capture_output=True, timeout=120)
        if r.returncode != 0 or b"wrote" not in r.stdout:
            raise RuntimeError(f"qemu-io write failed: {r.stdout.decode()} {r.stderr.decode()}")
        src.unlink()
