"""Build a fleet of realistic VM disk images for the benchmark, without root and without mounting.

Each disk is an ext4 filesystem image:

* an "operating system" part made once with ``mke2fs -d`` from real files found on this machine
  (binaries, shared libraries, documentation), then cloned for every VM, as VMs cloned from one
  template are: the same files at the same places on every disk;
* per-VM unique data written into the filesystem with ``debugfs -w``: incompressible files (media,
  encrypted archives) and compressible text logs;
* the rest free space, left as holes in the image file as a freshly made filesystem has it.

Generation 1 changes a few percent of every disk through the filesystem (files deleted, rewritten
and added) and writes the changed extents as hints (``offset length`` lines), computed by comparing
the two generations in 4 KiB units.

Usage: ``python -m bench.fleet OUT_DIR [--count 4] [--size 2GiB] ...``; ``--help`` lists the knobs.
Everything is seeded, so the same arguments on the same machine give the same bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

MiB = 1 << 20
GiB = 1 << 30
FS_BLOCK = 4096

# Where the "operating system" files come from, visited round-robin so that the template mixes
# executables, libraries and text the way an installed system does.
OS_ROOTS = (
    "/usr/bin",
    "/usr/sbin",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/python3.11",
    "/usr/lib/gcc",
    "/usr/libexec",
    "/usr/share/doc",
    "/usr/share/man",
    "/usr/share/locale",
    "/usr/include",
    "/usr/share/perl",
    "/usr/lib/python3",
    "/usr/share/i18n",
)

LOG_PROGRAMS = ("sshd", "cron", "kernel", "systemd", "nginx", "postgres", "dockerd", "sudo")
LOG_TEMPLATES = (
    "Accepted publickey for {user} from 10.{a}.{b}.{c} port {port} ssh2: ED25519 SHA256:{token}",
    "pam_unix(sshd:session): session opened for user {user}(uid={uid}) by (uid=0)",
    '10.{a}.{b}.{c} - - "GET /api/v1/items/{n}?page={m} HTTP/1.1" {status} {size} "-" "curl/7.88.1"',
    "duration: {ms}.{n} ms  statement: SELECT * FROM orders WHERE customer_id = {uid} LIMIT {m}",
    "Started session-{n}.scope - Session {n} of User {user}.",
    "({user}) CMD (/usr/lib/sysstat/debian-sa1 1 1)",
    "EXT4-fs (vda1): mounted filesystem {token} r/w with ordered data mode. Quota mode: none.",
    "container {token} exited with code {m} after {ms}ms",
)


def parse_size(text: str) -> int:
    """``2GiB``, ``512MiB``, ``64k`` or plain bytes."""
    units = {"k": 1 << 10, "m": MiB, "g": GiB, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


@dataclass
class FleetSpec:
    count: int = 4
    disk_size: int = 2 * GiB
    os_fraction: float = 0.25
    random_fraction: float = 0.06
    text_fraction: float = 0.04
    change_fraction: float = 0.02
    seed: int = 1


def _run(*cmd: str, stdin: str | None = None) -> None:
    proc = subprocess.run(cmd, input=stdin, text=True, capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")


def _tool(name: str) -> str:
    for d in ("", "/usr/sbin/", "/sbin/"):
        p = shutil.which(d + name) if not d else (d + name if os.access(d + name, os.X_OK) else None)
        if p:
            return p
    raise SystemExit(f"{name} not found: install e2fsprogs (apt-get install e2fsprogs)")


def stage_os_tree(dest: Path, budget: int) -> int:
    """Copy real files from this machine into ``dest`` until ``budget`` bytes; return bytes copied."""
    per_root: list[list[tuple[Path, int]]] = []
    for root in OS_ROOTS:
        files: list[tuple[Path, int]] = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for fn in sorted(filenames):
                p = Path(dirpath, fn)
                try:
                    st = p.lstat()
                except OSError:
                    continue
                # mke2fs -d spends about a millisecond per file, so the many tiny files of a real
                # system (a few percent of its bytes) are left out to keep the build quick
                if p.is_symlink() or not p.is_file() or not 16 * 1024 <= st.st_size <= 64 * MiB:
                    continue
                if os.access(p, os.R_OK):
                    files.append((p, st.st_size))
        if files:
            per_root.append(files)
    copied = 0
    cursors = [0] * len(per_root)
    while copied < budget and any(c < len(f) for c, f in zip(cursors, per_root)):
        for i, files in enumerate(per_root):
            # take roughly 4 MiB from each root per round so the mix stays even
            taken = 0
            while cursors[i] < len(files) and taken < 4 * MiB and copied < budget:
                src, size = files[cursors[i]]
                cursors[i] += 1
                target = dest / src.relative_to("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    shutil.copyfile(src, target)
                except OSError:
                    continue
                taken += size
                copied += size
    return copied


def log_text(rng: random.Random, size: int) -> bytes:
    """Syslog-like text: compressible, but not trivially so."""
    out: list[str] = []
    n = 0
    t = 1_790_000_000 + rng.randrange(10_000_000)
    users = [f"user{i:02d}" for i in range(40)]
    while n < size:
        t += rng.randrange(3)
        prog = rng.choice(LOG_PROGRAMS)
        msg = rng.choice(LOG_TEMPLATES).format(
            user=rng.choice(users), a=rng.randrange(256), b=rng.randrange(256), c=rng.randrange(256),
            port=rng.randrange(1024, 65536), token="%016x" % rng.getrandbits(64), uid=rng.randrange(1000, 5000),
            n=rng.randrange(100000), m=rng.randrange(100), status=rng.choice((200, 200, 200, 304, 404, 500)),
            size=rng.randrange(100, 90000), ms=rng.randrange(1, 2000),
        )
        line = f"{time.strftime('%b %d %H:%M:%S', time.gmtime(t))} vm {prog}[{rng.randrange(1, 65535)}]: {msg}\n"
        out.append(line)
        n += len(line)
    return "".join(out).encode()[:size]


def _file_sizes(rng: random.Random, total: int, lo: int, hi: int) -> list[int]:
    sizes: list[int] = []
    while total > 0:
        s = min(total, rng.randrange(lo, hi) // FS_BLOCK * FS_BLOCK + rng.randrange(FS_BLOCK))
        sizes.append(s)
        total -= s
    return sizes


class DebugfsBatch:
    """Collects debugfs commands and the scratch files they write, then runs them in one process."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.cmds: list[str] = []
        self.n = 0

    def mkdir(self, path: str) -> None:
        self.cmds.append(f"mkdir {path}")

    def write(self, path: str, data: bytes) -> None:
        self.n += 1
        local = self.scratch / f"f{self.n}"
        local.write_bytes(data)
        self.cmds.append(f"write {local} {path}")

    def rm(self, path: str) -> None:
        self.cmds.append(f"rm {path}")

    def run(self, image: Path) -> None:
        cmdfile = self.scratch / "cmds"
        cmdfile.write_text("\n".join(self.cmds) + "\n")
        proc = subprocess.run([_tool("debugfs"), "-w", "-f", str(cmdfile), str(image)], capture_output=True, text=True)
        # debugfs exits 0 even when a command fails; its complaints are on stderr after the banner
        errors = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("debugfs ")]
        if proc.returncode != 0 or errors:
            raise RuntimeError(f"debugfs on {image} failed: {' / '.join(errors[:5])}")
        for f in self.scratch.iterdir():
            f.unlink()
        self.cmds.clear()


def _data_ranges(fd: int, size: int, step: int) -> set[int]:
    """Offsets (multiples of ``step``) of the windows that hold any allocated data."""
    out: set[int] = set()
    off = 0
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after off
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.update(range(start // step * step, end, step))
        off = end
    return out


def changed_extents(a: Path, b: Path, unit: int = FS_BLOCK) -> list[tuple[int, int]]:
    """Byte ranges (offset, length) where two images differ, in ``unit`` granularity."""
    size = max(a.stat().st_size, b.stat().st_size)
    out: list[tuple[int, int]] = []
    step = 4 * MiB
    with open(a, "rb") as fa, open(b, "rb") as fb:
        windows = _data_ranges(fa.fileno(), size, step) | _data_ranges(fb.fileno(), size, step)
        for off in sorted(windows):
            x = os.pread(fa.fileno(), step, off)
            y = os.pread(fb.fileno(), step, off)
            if x == y:
                continue
            for u in range(0, max(len(x), len(y)), unit):
                if x[u:u + unit] != y[u:u + unit]:
                    o = off + u
                    if out and out[-1][0] + out[-1][1] == o:
                        out[-1] = (out[-1][0], out[-1][1] + unit)
                    else:
                        out.append((o, unit))
    return [(o, min(n, size - o)) for o, n in out]


def build(out: Path, spec: FleetSpec, *, log=print) -> dict:
    """Build ``out/gen0``, ``out/gen1`` and ``out/gen1/*.hints``; return the fleet description."""
    out.mkdir(parents=True, exist_ok=True)
    gen0, gen1 = out / "gen0", out / "gen1"
    for d in (gen0, gen1):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        tmpd = Path(tmp)
        stage = tmpd / "root"
        stage.mkdir()
        os_bytes = stage_os_tree(stage, int(spec.disk_size * spec.os_fraction))
        template = tmpd / "template.img"
        with open(template, "wb") as f:
            f.truncate(spec.disk_size)
        _run(_tool("mke2fs"), "-q", "-F", "-t", "ext4", "-E", "root_owner=0:0", "-d", str(stage), str(template))
        shutil.rmtree(stage)
        log(f"template: {os_bytes / MiB:.0f} MiB of system files from this machine")
        scratch = tmpd / "scratch"
        scratch.mkdir()
        disks = []
        for i in range(spec.count):
            name = f"vm{i + 1}.img"
            rng = random.Random(spec.seed * 1000 + i)
            img0 = gen0 / name
            _run("cp", "--sparse=always", str(template), str(img0))
            batch = DebugfsBatch(scratch)
            for d in ("/srv", "/srv/media", "/var", "/var/log", "/var/log/app", "/home", "/home/data"):
                batch.mkdir(d)
            media = _file_sizes(rng, int(spec.disk_size * spec.random_fraction), 1 * MiB, 24 * MiB)
            for k, s in enumerate(media):
                batch.write(f"/srv/media/clip{k:04d}.bin", rng.randbytes(s))
            logs = _file_sizes(rng, int(spec.disk_size * spec.text_fraction), 256 * 1024, 8 * MiB)
            for k, s in enumerate(logs):
                batch.write(f"/var/log/app/app.log.{k}", log_text(rng, s))
            batch.run(img0)

            # generation 1: delete, rewrite and add files, about change_fraction of the disk
            img1 = gen1 / name
            _run("cp", "--sparse=always", str(img0), str(img1))
            budget = int(spec.disk_size * spec.change_fraction)
            batch = DebugfsBatch(scratch)
            for k in rng.sample(range(len(media)), max(1, len(media) // 10)):
                batch.rm(f"/srv/media/clip{k:04d}.bin")  # deleted
            new = 0
            for k in rng.sample(range(len(logs)), max(1, len(logs) // 5)):  # rewritten: logs grew
                if new >= budget // 2:
                    break
                grown = logs[k] + rng.randrange(64 * 1024, 1 * MiB)
                body = log_text(random.Random(spec.seed * 1000 + i + 7919 * k), grown)
                batch.rm(f"/var/log/app/app.log.{k}")
                batch.write(f"/var/log/app/app.log.{k}", body)
                new += len(body)
            k = 0
            while new < budget:  # added: new media and data files
                s = min(budget - new, rng.randrange(1 * MiB, 16 * MiB))
                batch.write(f"/home/data/upload{k:04d}.bin", rng.randbytes(s))
                new += s
                k += 1
            batch.run(img1)
            ext = changed_extents(img0, img1)
            hints = gen1 / f"{name}.hints"
            hints.write_text("".join(f"{o} {n}\n" for o, n in ext))
            changed = sum(n for _, n in ext)
            disks.append({"name": name, "size": spec.disk_size, "changed_bytes": changed, "extents": len(ext)})
            log(f"{name}: {changed / MiB:.1f} MiB changed in {len(ext)} extents")
    desc = {"spec": asdict(spec), "os_bytes": os_bytes, "disks": disks, "seconds": round(time.monotonic() - t0, 1)}
    (out / "fleet.json").write_text(json.dumps(desc, indent=2))
    return desc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--count", type=int, default=4, help="number of VMs, one disk each (4)")
    ap.add_argument("--size", type=parse_size, default=2 * GiB, help="disk size (2GiB)")
    ap.add_argument("--os-fraction", type=float, default=0.25, help="system files shared by every disk (0.25)")
    ap.add_argument("--random-fraction", type=float, default=0.06, help="incompressible unique data (0.06)")
    ap.add_argument("--text-fraction", type=float, default=0.04, help="compressible unique logs (0.04)")
    ap.add_argument("--change-fraction", type=float, default=0.02, help="new data per disk in generation 1 (0.02)")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    spec = FleetSpec(a.count, a.size, a.os_fraction, a.random_fraction, a.text_fraction, a.change_fraction, a.seed)
    build(a.out, spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
