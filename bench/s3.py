"""The S3 variant of the fleet benchmark: blockferry and restic backing up into the same radosgw.

Usage: ``python -m bench.s3 [--count 2] [--size 512MiB] [--output bench/results/s3-latest.json]``.

A one-node Ceph cluster with radosgw (memstore OSD, as the tests use: tests/plugins/rgw.py) runs
on loopback on the same two cores as the tools, so the server sets much of the pace. Each tool
gets its own bucket; radosgw's usage log counts every request per bucket and kind, so the request
figures are the server's own. Steps, per tool: full backup of generation 0, incremental of
generation 1 (blockferry with the changed-extent hints, restic rescanning as it normally does),
restore of the latest point, checked bit-exact. Targets (from issue 7): full backup and restore
no slower than restic, fewer requests per GiB, the incremental at least 10x faster.

As in the local benchmark, every step runs ``--repeat`` times (new buckets and caches each time)
and the median run is reported; before each backup the page cache is emptied (as root) and
refilled with the images, and each tool's own code is loaded and its points listed once, untimed
(so its cache files are read back, and the server has answered it once). A restore's
``durable_wall`` adds the ``sync`` right after it (blockferry's restore returns with the data on
disk, restic's with it in the page cache).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.fleet import FleetSpec, parse_size
from bench.runner import (
    HERE,
    ROOT,
    drop_caches,
    fleet_for,
    install_blockferry,
    link_generation,
    log,
    machine,
    median_of,
    run_measured,
    same_content,
    version_of,
    warm,
)

GiB = 1 << 30
PUT_KINDS = ("put_obj", "init_multipart", "complete_multipart", "post_obj", "copy_obj")
GET_KINDS = ("get_obj",)
STEPS = ("full", "incremental", "restore")
#: the row of backups run as jobs of a resident ``blockferry daemon`` (no restore)
DAEMON = "blockferry-daemon"


def _tools(py: Path, restic: str, endpoint: str, env: dict[str, str], work: Path, rep: int) -> dict[str, dict[str, Any]]:
    """How each tool is run in repetition ``rep``: its own bucket and cache, both new each time."""
    bf_bucket, restic_bucket = f"bench-blockferry-{rep}", f"bench-restic-{rep}"
    bf_url = f"s3://{bf_bucket}/fleet"
    bf = [str(py), "-m", "blockferry"]

    def bf_backup(data: Path, gen: int, hints: dict[str, Path]) -> list[str]:
        images = sorted(data.glob("*.img"))
        extents = [x for p in images if gen and p.name in hints for x in ("--changed-extents", f"{p}={hints[p.name]}")]
        return [*bf, "backup", bf_url, *map(str, images), "--name", "fleet", "-q", *extents]

    # the same backups as jobs of a resident daemon (blockferry daemon): the S3 client, the
    # index and the imports are already there when a run starts, as on a backup server
    d_bucket = f"bench-daemon-{rep}"
    d_url = f"s3://{d_bucket}/fleet"
    d_env = env | {"BLOCKFERRY_SOCKET": str(work / "bfd.sock"), "BLOCKFERRY_CACHE_DIR": str(work / "bfd-cache")}

    def d_prepare(data: Path, gen: int, hints: dict[str, Path]) -> None:
        disks = ", ".join(
            "{ source = " + json.dumps(str(p)) + (", hints = " + json.dumps(str(hints[p.name])) if gen and p.name in hints else "")
            + " }" for p in sorted(data.glob("*.img")))
        conf = work / "bfd.toml"
        conf.write_text(f'[[repositories]]\nname = "s3"\nurl = "{d_url}"\n\n[[proxies]]\nname = "local"\nmax_tasks = 4\n\n'
                        f'[[jobs]]\nname = "fleet"\nrepository = "s3"\n[[jobs.objects]]\nname = "fleet"\ndisks = [{disks}]\n')
        subprocess.run([*bf, "config", "apply", str(conf)], env=d_env, capture_output=True, check=True)

    return {
        "blockferry": {
            "bucket": bf_bucket, "cache": work / "bf-cache",
            "env": env | {"BLOCKFERRY_CACHE_DIR": str(work / "bf-cache")},
            "init": [*bf, "init", bf_url, "--create-bucket"],
            "warm": [str(py), "-c", "import blockferry.cli, blockferry.actors.server, blockferry.restore.files, "
                     "blockferry.plugins.s3, blockferry.plugins.file_source, aiobotocore.session"],
            "ready": [*bf, "points", bf_url],
            "backup": bf_backup,
            "restore": lambda out: [*bf, "restore", bf_url, "latest", "--to", str(out), "-q"],
        },
        "restic": {
            "bucket": restic_bucket, "cache": work / "restic-cache",
            "env": env | {"RESTIC_PASSWORD": "bench", "RESTIC_CACHE_DIR": str(work / "restic-cache"),
                          "RESTIC_REPOSITORY": f"s3:{endpoint}/{restic_bucket}/fleet"},
            "init": [restic, "init", "-q", "--repository-version", "2"],
            "warm": [restic, "version"],
            "ready": [restic, "snapshots", "-q"],
            "backup": lambda data, gen, hints: [restic, "backup", "-q", "--compression", "auto", "."],
            "restore": lambda out: [restic, "restore", "-q", "latest", "--target", str(out)],
        },
        DAEMON: {
            "bucket": d_bucket, "cache": work / "bfd-cache", "env": d_env,
            "init": [*bf, "init", d_url, "--create-bucket"],
            "warm": [str(py), "-c", "import blockferry.cli, blockferry.daemon.client"],
            "ready": [*bf, "status"],
            "daemon": [*bf, "daemon", "--state-dir", str(work / f"bfd-state-{rep}"), "-q"],
            "prepare": d_prepare,
            "backup": lambda data, gen, hints: [*bf, "job", "run", "fleet", "--wait", "-q"],
            "restore": None,  # restores are not daemon jobs
        },
    }


def _cpu_and_peak(pid: int) -> tuple[float, int]:
    """A running process's CPU seconds so far and its peak RSS (bytes), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    hwm = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmHWM:"))
    return cpu, hwm * 1024


def _start_daemon(tool: dict[str, Any], sock: Path) -> subprocess.Popen[bytes]:
    sock.unlink(missing_ok=True)
    proc = subprocess.Popen(tool["daemon"], env=tool["env"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("blockferry daemon did not start")
        time.sleep(0.1)
    return proc


def ready(tool: dict[str, Any]) -> None:
    """Untimed, after the page cache was emptied: load the tool's own code, then list its points
    (its cache files are read back; the server answers the tool once before the timed step)."""
    for cmd in (tool["warm"], tool["ready"]):
        subprocess.run(cmd, env=tool["env"], capture_output=True, check=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.s3", description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=HERE / "work" / "s3", help="fleet and scratch space")
    ap.add_argument("--count", type=int, default=2, help="disks in the fleet (2)")
    ap.add_argument("--size", type=parse_size, default=512 << 20, help="disk size (512MiB)")
    ap.add_argument("--memstore", type=parse_size, default=4 * GiB, help="RAM for the OSD's memstore (4GiB)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of every step, new buckets each time; medians (3)")
    ap.add_argument("--output", type=Path, default=HERE / "results" / "s3-latest.json")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from tests.plugins.rgw import RadosGW

    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    spec = FleetSpec(count=a.count, disk_size=a.size)
    fleet, desc = fleet_for(work, spec)
    disk_bytes = a.count * a.size
    py = install_blockferry(work)
    subprocess.run([str(py), "-m", "pip", "install", "-q", f"{ROOT}[s3]"], check=True)  # the s3 extra
    restic = shutil.which("restic") or "/usr/bin/restic"
    rgw = RadosGW(Path(tempfile.mkdtemp(prefix="bench-rgw-", dir=work)), memstore_bytes=a.memstore, usage_log=True)
    log("starting radosgw (one-node Ceph on loopback)")
    rgw.start()
    hints = {p.name.removesuffix(".hints"): p for p in (fleet / "gen1").glob("*.hints")}
    originals = {p.name: p for p in (fleet / "gen1").glob("*.img")}
    data, out = work / "data", work / "restore"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work)} | rgw.env()
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        s: {"blockferry": [], "restic": [], **({} if s == "restore" else {DAEMON: []})} for s in STEPS}
    daemon: subprocess.Popen[bytes] | None = None
    try:
        for rep in range(1, a.repeat + 1):
            tools = _tools(py, restic, rgw.endpoint, env, work, rep)

            def counted(tool: str, cmd: list[str], cwd: Path) -> dict[str, Any]:
                bucket = tools[tool]["bucket"]
                before = rgw.usage().get(bucket, {})
                served = daemon if tool == DAEMON else None
                cpu0 = _cpu_and_peak(served.pid)[0] if served else 0.0
                r = run_measured(cmd, cwd=cwd, env=tools[tool]["env"])
                if served:  # the work is the daemon's: its CPU, and the higher peak RSS of the two
                    cpu1, peak = _cpu_and_peak(served.pid)
                    r.cpu += cpu1 - cpu0
                    r.rss = max(r.rss, peak)
                time.sleep(2.5)  # the usage log is flushed every second
                after = rgw.usage().get(bucket, {})
                ops = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}
                puts = sum(v for k, v in ops.items() if k in PUT_KINDS or k.startswith("put_obj"))
                gets = sum(v for k, v in ops.items() if k in GET_KINDS)
                return {"wall": r.wall, "cpu": r.cpu, "rss": r.rss, "requests": sum(ops.values()), "puts": puts,
                        "gets": gets, "requests_per_gib": sum(ops.values()) / (disk_bytes / GiB), "by_kind": ops}

            for name, t in tools.items():
                shutil.rmtree(t["cache"], ignore_errors=True)
            daemon = _start_daemon(tools[DAEMON], work / "bfd.sock")
            for name, t in tools.items():
                r = subprocess.run(t["init"], env=t["env"], capture_output=True, text=True)
                if r.returncode != 0:
                    raise SystemExit(f"{name} init failed: {r.stderr}")
            for step, gen in (("full", 0), ("incremental", 1)):
                link_generation(fleet / f"gen{gen}", data)
                for name, t in tools.items():
                    if "prepare" in t:
                        t["prepare"](data, gen, hints)
                    warm([data])
                    ready(t)
                    log(f"{step} ({rep}/{a.repeat}): {name}")
                    runs[step][name].append(counted(name, t["backup"](data, gen, hints), data))
            for name, t in tools.items():
                if t["restore"] is None:
                    continue
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                drop_caches()
                ready(t)
                log(f"restore ({rep}/{a.repeat}): {name}")
                r = counted(name, t["restore"](out), out)
                # as in the local benchmark: blockferry returns with the data on disk, restic with
                # it in the page cache; the sync right after is what restic leaves to do
                t0 = time.perf_counter()
                subprocess.run(["sync"], check=False)
                r["flush"] = time.perf_counter() - t0
                r["durable_wall"] = r["wall"] + r["flush"]
                restored = {p.name: p for p in out.rglob("*.img")}
                r["bit_exact"] = sorted(restored) == sorted(originals) and all(
                    same_content(restored[n], p) for n, p in originals.items())
                if not r["bit_exact"]:
                    log(f"restore of {name} is NOT bit-exact")
                runs["restore"][name].append(r)
            shutil.rmtree(out, ignore_errors=True)
            daemon.terminate()
            daemon.wait(90)
            for t in tools.values():  # the next run starts from empty buckets; the memstore stays small
                rgw.remove_bucket(t["bucket"])
            rgw.collect_garbage()  # and on a server that is not still deleting this run's objects
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
        rgw.stop()
        shutil.rmtree(rgw.root, ignore_errors=True)
    results = {s: {tool: median_of(v) for tool, v in by_tool.items()} for s, by_tool in runs.items()}
    for tool, v in runs["restore"].items():
        results["restore"][tool]["bit_exact"] = all(x["bit_exact"] for x in v)

    def ratio(step: str, key: str) -> float:
        return results[step]["restic"][key] / max(1e-9, results[step]["blockferry"][key])

    res = {
        "machine": machine(), "fleet": desc, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": {"blockferry": version_of([str(py), "-m", "blockferry", "--version"]),
                     "restic": version_of([restic, "version"])},
        "server": "radosgw (Ceph 16, memstore OSD) on loopback, same machine",
        "steps": results,
        "targets": {
            "full_no_slower": ratio("full", "wall") >= 1.0,
            "restore_no_slower": ratio("restore", "wall") >= 1.0,
            "restore_no_slower_until_on_disk": ratio("restore", "durable_wall") >= 1.0,
            "fewer_requests": all(results[s]["blockferry"]["requests"] < results[s]["restic"]["requests"]
                                  for s in results),
            "incremental_10x": ratio("incremental", "wall") >= 10.0,
            "incremental_speedup": ratio("incremental", "wall"),
            # not the target's figure (that is the command's), what a backup server gets
            "incremental_speedup_daemon": results["incremental"]["restic"]["wall"]
            / max(1e-9, results["incremental"][DAEMON]["wall"]),
        },
    }
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(res, indent=2))
    print(f"{'step':12} {'tool':17} {'wall s':>8} {'requests':>9} {'PUTs':>6} {'GETs':>6} {'req/GiB':>8}")
    for step, by_tool in results.items():
        for tool, r in by_tool.items():
            print(f"{step:12} {tool:17} {r['wall']:8.2f} {r['requests']:9d} {r['puts']:6d} {r['gets']:6d} "
                  f"{r['requests_per_gib']:8.1f}" + ("" if r.get("bit_exact", True) else "  NOT BIT-EXACT"))
    print(json.dumps(res["targets"]))
    print(f"results: {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
