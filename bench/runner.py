"""The benchmark: blockferry against restic and borg, in one run, on the same data.

Steps, for every tool: a full backup of generation 0 of the fleet, an incremental of generation
1 (blockferry with the changed-extent hints; restic and borg as they are normally used, rescanning
the images), then a restore of the generation-1 point, checked bit for bit. Each step is timed as
a whole process (wall time, CPU time and peak RSS from ``wait4``), and the repository is measured
after each backup. Before every step the page cache is emptied (when the runner may: as root),
then warmed with what the step reads (the tool's repository and its cache directory, and before
backups also the images and the hint files), and ``sync`` runs, so the figures measure the
engines, not the disk, and every tool meets the same machine state.

The machine ceiling (bench/ceiling.py) is measured right before each of blockferry's full
backups; the full-backup efficiency is the median of those pairs' ratios. Then: blockferry's
peak RSS for a 2 GiB and a 16 GiB (sparse) disk, and many small disks through two proxies
(bench/scale.py).

``python -m bench --help`` lists the options; ``make bench`` runs the default.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fleet import FleetSpec, build, parse_size

MiB = 1 << 20
GiB = 1 << 30
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

TARGETS = {  # from the benchmark issue
    "full_speedup": 4.0,
    "full_efficiency": 0.75,
    "incremental_speedup": 20.0,
    "restore_speedup": 3.0,
    "peak_rss": 256 * MiB,
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- measuring --------------------------------------------------------------------------------------


@dataclass
class Run:
    wall: float
    cpu: float
    rss: int
    rc: int
    stderr: str = ""


def run_measured(cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
                 check: bool = True) -> Run:
    """Run a command as a whole process; its wall time, CPU time and peak RSS (from wait4)."""
    subprocess.run(["sync"], check=False)
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        text = err.read().decode(errors="replace")
    run = Run(wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss * 1024, p.returncode, text[-4000:])
    if check and run.rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with {run.rc}: {run.stderr}")
    return run


def drop_caches() -> bool:
    """Empty the page cache (needs root); False if not allowed."""
    subprocess.run(["sync"], check=False)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def warm(paths: list[Path]) -> None:
    """Read files so they are in the page cache (holes of sparse files are not read)."""
    drop_caches()
    for root in paths:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                off = 0
                while off < size:
                    try:
                        start = os.lseek(fd, off, os.SEEK_DATA)
                    except OSError:
                        break
                    end = os.lseek(fd, start, os.SEEK_HOLE)
                    while start < end:
                        n = len(os.pread(fd, min(8 * MiB, end - start), start))
                        if not n:
                            break
                        start += n
                    off = end
            finally:
                os.close(fd)


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _data(fd: int, size: int) -> list[tuple[int, int]]:
    out, off = [], 0
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        out.append((start, end))
        off = end
    return out


def same_content(a: Path, b: Path) -> bool:
    """Bit-exact comparison that reads only where either file has data (holes are zeros)."""
    if a.stat().st_size != b.stat().st_size:
        return False
    size = a.stat().st_size
    fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_RDONLY)
    try:
        regions = sorted(_data(fa, size) + _data(fb, size))
        pos = 0
        for start, end in regions:
            start = max(start, pos)
            while start < end:
                n = min(8 * MiB, end - start)
                if os.pread(fa, n, start) != os.pread(fb, n, start):
                    return False
                start += n
            pos = max(pos, end)
        return True
    finally:
        os.close(fa)
        os.close(fb)


# -- the tools ------------------------------------------------------------------------------------


def make_venv(venv: Path) -> bool:
    """A virtualenv at ``venv`` made from the interpreter running the benchmark; True if it was
    made now. One made from another interpreter is made anew: borg and blockferry run Python, and
    the interpreter's build moves their figures (an unoptimized CPython ran blockferry's
    incremental 8 % slower than Debian's)."""
    py = venv / "bin" / "python"
    if py.exists():
        here = f"{sys.base_prefix} {sys.version}"
        there = subprocess.run([str(py), "-c", "import sys; print(sys.base_prefix, sys.version)"],
                               capture_output=True, text=True)
        if there.returncode == 0 and there.stdout.strip() == here:
            return False
        log(f"{venv} was made from another Python; making it anew")
        shutil.rmtree(venv)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    return True


def ensure_peers(work: Path) -> dict[str, str]:
    """restic from Debian; borg from Debian or PyPI, whichever is newer (built in a venv)."""
    subprocess.run([str(ROOT / "scripts" / "system-packages"), "bench"], check=True)
    tools = {"restic": shutil.which("restic") or "/usr/bin/restic"}
    debian = subprocess.run(["apt-cache", "policy", "borgbackup"], capture_output=True, text=True).stdout
    m = re.search(r"Candidate:\s*(\S+)", debian)
    deb_version = m.group(1) if m and m.group(1) != "(none)" else "0"
    pypi = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "borgbackup"], capture_output=True,
                          text=True).stdout
    m = re.search(r"borgbackup \(([^)]+)\)", pypi)
    pypi_version = m.group(1) if m else "0"

    def key(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", v.split(":")[-1].split("-")[0])[:3])

    if key(pypi_version) > key(deb_version):
        venv = work / "borg-venv"
        borg = venv / "bin" / "borg"
        make_venv(venv)  # a venv made now has no borg yet
        if not borg.exists() or pypi_version not in subprocess.run([str(borg), "--version"], capture_output=True,
                                                                   text=True).stdout:
            log(f"installing borg {pypi_version} from PyPI (newer than Debian's {deb_version}); this builds it")
            subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"borgbackup=={pypi_version}"], check=True)
        tools["borg"] = str(borg)
    else:
        if not shutil.which("borg"):
            subprocess.run(["apt-get", "install", "-y", "-qq", "borgbackup"], check=True)
        tools["borg"] = shutil.which("borg") or "/usr/bin/borg"
    return tools


def version_of(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True)
    return (out.stdout or out.stderr).strip().splitlines()[0]


@dataclass
class Tool:
    name: str
    repo: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))

    def init(self) -> None: ...
    def warm_cmd(self) -> list[str]: ...

    def state(self) -> list[Path]:
        """What the tool keeps between runs: its repository and its cache directory (restic's
        cache, borg's base directory), which every step reads."""
        return [p for p in (self.repo, Path(f"{self.repo}.cache"), Path(f"{self.repo}.base")) if p.exists()]

    def backup_cmd(self, data: Path, gen: int, hints: dict[str, Path]) -> list[str]: ...
    def restore_cmd(self, out: Path) -> list[str]: ...


def install_blockferry(work: Path) -> Path:
    """blockferry as users get it: installed (not editable, byte-compiled) from this work tree
    into the benchmark's own virtualenv. Returns its python."""
    venv = work / "venv"
    py = venv / "bin" / "python"
    make_venv(venv)
    log("installing blockferry from this work tree into the benchmark's virtualenv")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", str(ROOT)], check=True,
                   env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    subprocess.run([str(py), "-m", "pip", "install", "-q", str(ROOT)], check=True)
    # byte-compiled like any installed package, even where PYTHONDONTWRITEBYTECODE is set
    site = subprocess.run([str(py), "-c", "import blockferry, os; print(os.path.dirname(blockferry.__file__))"],
                          check=True, capture_output=True, text=True, cwd="/").stdout.strip()
    subprocess.run([str(py), "-m", "compileall", "-q", site], check=True)
    return py


class Blockferry(Tool):
    exe = [sys.executable, "-m", "blockferry"]

    def warm_cmd(self) -> list[str]:
        return [self.exe[0], "-c", "import blockferry.cli, blockferry.actors.server, blockferry.restore.files, "
                "blockferry.repo.verify, blockferry.plugins.local, blockferry.plugins.file_source"]

    def init(self) -> None:
        subprocess.run(self.exe + ["init", str(self.repo)], check=True, stdout=subprocess.DEVNULL, env=self.env)

    def backup_cmd(self, data: Path, gen: int, hints: dict[str, Path]) -> list[str]:
        images = sorted(str(p) for p in data.glob("*.img"))
        cmd = self.exe + ["backup", str(self.repo), *images, "--name", "fleet", "-q"]
        for img in images:
            if gen and Path(img).name in hints:
                cmd += ["--changed-extents", f"{img}={hints[Path(img).name]}"]
        return cmd

    def restore_cmd(self, out: Path) -> list[str]:
        return self.exe + ["restore", str(self.repo), "latest", "--to", str(out), "-q"]


class Restic(Tool):
    def __init__(self, repo: Path, exe: str) -> None:
        super().__init__("restic", repo)
        self.exe = exe
        self.env.update(RESTIC_PASSWORD="bench", RESTIC_REPOSITORY=str(repo), RESTIC_CACHE_DIR=str(repo) + ".cache")

    def warm_cmd(self) -> list[str]:
        return [self.exe, "version"]

    def init(self) -> None:
        subprocess.run([self.exe, "init", "-q", "--repository-version", "2"], check=True, env=self.env)

    def backup_cmd(self, data: Path, gen: int, hints: dict[str, Path]) -> list[str]:
        return [self.exe, "backup", "-q", "--compression", "auto", "."]

    def restore_cmd(self, out: Path) -> list[str]:
        return [self.exe, "restore", "-q", "latest", "--target", str(out)]


class Borg(Tool):
    def __init__(self, repo: Path, exe: str) -> None:
        super().__init__("borg", repo)
        self.exe = exe
        self.env.update(BORG_REPO=str(repo), BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
                        BORG_RELOCATED_REPO_ACCESS_IS_OK="yes", BORG_BASE_DIR=str(repo) + ".base")

    def warm_cmd(self) -> list[str]:
        return [self.exe, "--version"]

    def init(self) -> None:
        subprocess.run([self.exe, "init", "-e", "none"], check=True, env=self.env)

    def backup_cmd(self, data: Path, gen: int, hints: dict[str, Path]) -> list[str]:
        return [self.exe, "create", "--compression", "zstd,3", f"::gen{gen}", "."]

    def restore_cmd(self, out: Path) -> list[str]:
        return [self.exe, "extract", "::gen1"]


# -- the run --------------------------------------------------------------------------------------


def link_generation(src: Path, data: Path) -> None:
    """Put a generation's images at the fixed path the tools back up (hard links: no copy)."""
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    for img in sorted(src.glob("*.img")):
        os.link(img, data / img.name)


def fleet_for(work: Path, spec: FleetSpec) -> tuple[Path, dict[str, Any]]:
    fleet = work / "fleet"
    desc_path = fleet / "fleet.json"
    if desc_path.exists():
        desc = json.loads(desc_path.read_text())
        if desc.get("spec") == spec.__dict__ and (fleet / "gen1").is_dir():
            log(f"reusing the fleet in {fleet}")
            return fleet, desc
    log(f"building the fleet: {spec.count} disks of {spec.disk_size / GiB:g} GiB in {fleet}")
    return fleet, build(fleet, spec, log=log)


def machine() -> dict[str, Any]:
    model = ""
    try:
        model = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": model, "cores": os.cpu_count(), "memory_bytes": mem, "kernel": platform.release(),
            "python": platform.python_version(), "python_prefix": sys.base_prefix}


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median run's figures (by wall time); peak RSS is the highest seen; all runs kept."""
    ordered = sorted(runs, key=lambda r: r["wall"])
    out = dict(ordered[len(ordered) // 2])
    out["rss"] = max(r["rss"] for r in runs)
    out["walls"] = [r["wall"] for r in runs]  # in the order they ran
    return out


def measure_ceiling(images: list[str]) -> dict[str, Any]:
    """One run of bench/ceiling.py (its blocks are loaded before its clock starts)."""
    c = subprocess.run([sys.executable, "-m", "bench.ceiling", *images], check=True, capture_output=True,
                       text=True, cwd=ROOT)
    return json.loads(c.stdout)


def efficiency(ceilings: list[dict[str, Any]], full: dict[str, Any]) -> dict[str, Any]:
    """The full-backup efficiency: the median over the pairs (the ceiling measured right before
    each full backup) of ceiling time / backup time; also the median ceiling run, and the ratio of
    the two medians as earlier runs reported it."""
    if len(ceilings) != len(full["walls"]):
        raise ValueError(f"{len(ceilings)} ceilings for {len(full['walls'])} full backups")
    pairs = [c["seconds"] / w for c, w in zip(ceilings, full["walls"])]
    median = dict(sorted(ceilings, key=lambda c: c["seconds"])[len(ceilings) // 2])
    median["all_seconds"] = [c["seconds"] for c in ceilings]
    return {"ceiling": median, "efficiency_pairs": pairs, "efficiency": statistics.median(pairs),
            "efficiency_of_medians": median["seconds"] / full["wall"]}


def run_steps(work: Path, fleet: Path, tools: list[Tool], repeat: int,
              ceilings: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Every step ``repeat`` times. With ``ceilings`` (a list to fill), the machine ceiling is
    measured right before each of blockferry's full backups, so that each efficiency figure
    compares two runs a few seconds apart: this machine's speed drifts by ±20 % over minutes."""
    data = work / "data"
    images = sorted(str(p) for p in (fleet / "gen0").glob("*.img"))
    hints = {p.name.removesuffix(".hints"): p for p in (fleet / "gen1").glob("*.hints")}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {s: {t.name: [] for t in tools}
                                                        for s in ("full", "incremental", "restore")}
    for rep in range(repeat):
        for t in tools:
            shutil.rmtree(t.repo, ignore_errors=True)
            for extra in (Path(str(t.repo) + ".cache"), Path(str(t.repo) + ".base")):
                shutil.rmtree(extra, ignore_errors=True)
            t.init()
        for step, gen in (("full", 0), ("incremental", 1)):
            link_generation(fleet / f"gen{gen}", data)
            for t in tools:
                if ceilings is not None and step == "full" and t.name == "blockferry":
                    log(f"ceiling ({rep + 1}/{repeat})")
                    ceilings.append(measure_ceiling(images))  # before the warming, which drops its memory
                warm([data, *hints.values(), *t.state()])
                subprocess.run(t.warm_cmd(), env=t.env, capture_output=True, check=True)  # the tool's own code
                log(f"{step} ({rep + 1}/{repeat}): {t.name}")
                r = run_measured(t.backup_cmd(data, gen, hints), cwd=data, env=t.env)
                runs[step][t.name].append({"wall": r.wall, "cpu": r.cpu, "rss": r.rss,
                                           "repo_bytes": tree_bytes(t.repo)})
    results: dict[str, dict[str, Any]] = {s: {t: median_of(v) for t, v in runs[s].items()}
                                          for s in ("full", "incremental")}
    results["restore"] = {}
    out = work / "restore"
    for t in tools:
        for rep in range(repeat):
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            warm(t.state())
            subprocess.run(t.warm_cmd(), env=t.env, capture_output=True, check=True)
            log(f"restore ({rep + 1}/{repeat}): {t.name}")
            r = run_measured(t.restore_cmd(out), cwd=out, env=t.env)
            # blockferry's restore returns once the data is on disk; restic and borg return with
            # it in the page cache: the time of a sync right after is what they leave to do
            t0 = time.perf_counter()
            subprocess.run(["sync"], check=False)
            flush = time.perf_counter() - t0
            restored = {p.name: p for p in out.rglob("*.img")}
            originals = {p.name: p for p in (fleet / "gen1").glob("*.img")}
            exact = sorted(restored) == sorted(originals) and all(same_content(restored[n], p)
                                                                  for n, p in originals.items())
            runs["restore"][t.name].append({
                "wall": r.wall, "cpu": r.cpu, "rss": r.rss, "bit_exact": exact,
                "flush": flush, "durable_wall": r.wall + flush,
                "allocated_bytes": sum(p.stat().st_blocks * 512 for p in restored.values()),
                "apparent_bytes": sum(p.stat().st_size for p in restored.values())})
            if not exact:
                log(f"restore of {t.name} is NOT bit-exact")
        results["restore"][t.name] = median_of(runs["restore"][t.name])
        results["restore"][t.name]["bit_exact"] = all(x["bit_exact"] for x in runs["restore"][t.name])
    shutil.rmtree(out, ignore_errors=True)
    return results


def scale_figures(work: Path, fleet: Path, small: int) -> dict[str, Any]:
    """Peak RSS of a 2 GiB and a 16 GiB disk, and many small disks through two proxies."""
    exe = Blockferry.exe
    d = work / "scale"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    src = sorted((fleet / "gen0").glob("*.img"))[0]
    big = d / "big.img"
    # 16 GiB, sparse: the 2 GiB disk's data eight times over, 2 GiB apart
    with open(big, "wb") as f:
        f.truncate(16 * GiB)
    for k in range(8):
        subprocess.run(["dd", f"if={src}", f"of={big}", "bs=4M", f"seek={k * 512}", "conv=sparse,notrunc",
                        "status=none"], check=True)
    out: dict[str, Any] = {}
    for name, img in (("2GiB", src), ("16GiB", big)):
        repo = d / f"repo-{name}"
        subprocess.run(exe + ["init", str(repo)], check=True, stdout=subprocess.DEVNULL)
        warm([img])
        subprocess.run(Blockferry("", repo).warm_cmd(), check=True)
        r = run_measured(exe + ["backup", str(repo), str(img), "-q"])
        out[f"disk_{name}"] = {"wall": r.wall, "rss": r.rss, "disk_bytes": img.stat().st_size}
    r = run_measured([exe[0], str(HERE / "scale.py"), "many", str(d / "many"), "--count", str(small)], cwd=d)
    out["many_small"] = {"wall": r.wall, "rss": r.rss, "disks": small, "ms_per_disk": 1000 * r.wall / small}
    shutil.rmtree(d, ignore_errors=True)
    return out


def table(res: dict[str, Any]) -> str:
    lines = [f"{'step':12} {'tool':11} {'wall s':>8} {'cpu s':>8} {'peak RSS':>10} {'repo/alloc':>11}  vs best peer"]
    for step in ("full", "incremental", "restore"):
        rows = res["steps"][step]
        peers = [v["wall"] for k, v in rows.items() if k != "blockferry"]
        best = min(peers) if peers else None
        for tool, v in rows.items():
            size = v.get("repo_bytes", v.get("allocated_bytes", 0))
            ratio = ""
            if best:
                ratio = f"{best / v['wall']:.2f}x" + (" faster" if tool == "blockferry" else "")
            exact = "" if "bit_exact" not in v else ("  bit-exact" if v["bit_exact"] else "  NOT EXACT")
            lines.append(f"{step:12} {tool:11} {v['wall']:8.2f} {v['cpu']:8.2f} {v['rss'] / MiB:8.0f} MiB "
                         f"{size / MiB:7.0f} MiB  {ratio}{exact}")
            step = ""
    rows = res["steps"]["restore"]
    if "durable_wall" in rows.get("blockferry", {}):
        durable = "; ".join(f"{tool} {v['durable_wall']:.2f} s" for tool, v in rows.items())
        lines.append(f"restore until on disk (the restore, then sync): {durable}")
    c = res.get("ceiling")
    if c:
        lines.append(f"ceiling: {c['seconds']:.2f} s (hash {c['data_blocks']} blocks, compress {c['unique_blocks']}, "
                     f"{c['threads']} threads); blockferry full-backup efficiency {res['efficiency']:.2f} "
                     f"(median of the pairs {', '.join(f'{e:.2f}' for e in res.get('efficiency_pairs', []))})")
    s = res.get("scale")
    if s:
        lines.append(f"peak RSS: 2 GiB disk {s['disk_2GiB']['rss'] / MiB:.0f} MiB, 16 GiB disk "
                     f"{s['disk_16GiB']['rss'] / MiB:.0f} MiB; {s['many_small']['disks']} small disks through 2 proxies "
                     f"x 4 tasks: {s['many_small']['wall']:.2f} s ({s['many_small']['ms_per_disk']:.1f} ms per disk), "
                     f"{s['many_small']['rss'] / MiB:.0f} MiB")
    for k, v in res.get("targets", {}).items():
        lines.append(f"target {k}: {v['value']:.2f} (target {v['target']}) {'met' if v['met'] else 'NOT MET'}")
    return "\n".join(lines)


def judge(res: dict[str, Any]) -> dict[str, Any]:
    st = res["steps"]

    def speedup(step: str) -> float:
        peers = [v["wall"] for k, v in st[step].items() if k != "blockferry"]
        return min(peers) / st[step]["blockferry"]["wall"] if peers else 0.0

    out: dict[str, Any] = {}
    if len(st["full"]) > 1:
        out["full_speedup"] = speedup("full")
        out["incremental_speedup"] = speedup("incremental")
        out["restore_speedup"] = speedup("restore")
        durable = [v["durable_wall"] for k, v in st["restore"].items() if k != "blockferry"]
        res["restore_speedup_until_on_disk"] = min(durable) / st["restore"]["blockferry"]["durable_wall"]
        peers_full = min(v["repo_bytes"] for k, v in st["full"].items() if k != "blockferry")
        peers_inc = min(v["repo_bytes"] for k, v in st["incremental"].items() if k != "blockferry")
        out["repo_vs_smaller_peer_full"] = st["full"]["blockferry"]["repo_bytes"] / peers_full
        out["repo_vs_smaller_peer_incremental"] = st["incremental"]["blockferry"]["repo_bytes"] / peers_inc
    if "efficiency" in res:
        out["full_efficiency"] = res["efficiency"]
    out["peak_rss"] = max(v["blockferry"]["rss"] for v in st.values())
    targets = {"repo_vs_smaller_peer_full": 1.0, "repo_vs_smaller_peer_incremental": 1.0, **TARGETS}
    judged = {}
    for k, v in out.items():
        t = targets[k]
        met = v <= t if k.startswith(("repo_", "peak_")) else v >= t
        judged[k] = {"value": v / MiB if k == "peak_rss" else v, "target": t / MiB if k == "peak_rss" else t, "met": met}
    return judged


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=HERE / "work", help="where the fleet and repositories go")
    ap.add_argument("--count", type=int, default=4, help="disks in the fleet (4)")
    ap.add_argument("--size", type=parse_size, default=2 * GiB, help="disk size (2GiB)")
    ap.add_argument("--peers", default="restic,borg", help="peers to run, comma-separated ('' for none)")
    ap.add_argument("--no-scale", action="store_true", help="skip the scale figures")
    ap.add_argument("--small-disks", type=int, default=200, help="disks in the many-small-disks figure (200)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of every step; the median is reported (3)")
    ap.add_argument("--output", type=Path, default=HERE / "results" / "latest.json", help="JSON results")
    a = ap.parse_args(argv)
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    spec = FleetSpec(count=a.count, disk_size=a.size)
    fleet, desc = fleet_for(work, spec)
    peers = [p for p in a.peers.split(",") if p]
    exes = ensure_peers(work) if peers else {}
    Blockferry.exe = [str(install_blockferry(work)), "-m", "blockferry"]
    tools: list[Tool] = [Blockferry("blockferry", work / "repo-blockferry")]
    if "restic" in peers:
        tools.append(Restic(work / "repo-restic", exes["restic"]))
    if "borg" in peers:
        tools.append(Borg(work / "repo-borg", exes["borg"]))
    versions = {"blockferry": version_of(Blockferry.exe + ["--version"])}
    for t in tools[1:]:
        versions[t.name] = version_of([exes[t.name], "version" if t.name == "restic" else "--version"])
    log("the page cache is warmed before every step (the tool's repository and cache; before backups "
        "also the images and hints); figures measure the engines, not the disk")
    res: dict[str, Any] = {"machine": machine(), "fleet": desc, "versions": versions,
                           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    res["page_cache_dropped"] = drop_caches()
    ceilings: list[dict[str, Any]] = []
    res["steps"] = run_steps(work, fleet, tools, a.repeat, ceilings)
    res.update(efficiency(ceilings, res["steps"]["full"]["blockferry"]))
    if not a.no_scale:
        log("scale figures")
        res["scale"] = scale_figures(work, fleet, a.small_disks)
    res["targets"] = judge(res)
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(res, indent=2))
    print(table(res))
    print(f"results: {a.output}")
    return 0
