"""The S3 variant of the fleet benchmark: blockferry and restic backing up into the same radosgw.

Usage: ``python -m bench.s3 [--count 2] [--size 512MiB] [--output bench/results/s3-latest.json]``.

A one-node Ceph cluster with radosgw (memstore OSD, as the tests use: tests/plugins/rgw.py) runs
on loopback on the same two cores as the tools, so the server sets much of the pace. Each tool
gets its own bucket; radosgw's usage log counts every request per bucket and kind, so the request
figures are the server's own. Steps, per tool: full backup of generation 0, incremental of
generation 1 (blockferry with the changed-extent hints, restic rescanning as it normally does),
restore of the latest point, checked bit-exact. Targets (from issue 7): full backup and restore
no slower than restic, fewer requests per GiB, the incremental at least 10x faster.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.fleet import FleetSpec, parse_size
from bench.runner import HERE, ROOT, fleet_for, install_blockferry, link_generation, log, machine, \
    run_measured, same_content, version_of

GiB = 1 << 30
PUT_KINDS = ("put_obj", "init_multipart", "complete_multipart", "post_obj", "copy_obj")
GET_KINDS = ("get_obj",)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.s3", description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=HERE / "work" / "s3", help="fleet and scratch space")
    ap.add_argument("--count", type=int, default=2, help="disks in the fleet (2)")
    ap.add_argument("--size", type=parse_size, default=512 << 20, help="disk size (512MiB)")
    ap.add_argument("--memstore", type=parse_size, default=4 * GiB, help="RAM for the OSD's memstore (4GiB)")
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
    try:
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work)} | rgw.env()
        bf_url = "s3://bench-blockferry/fleet"
        tools: dict[str, dict[str, Any]] = {
            "blockferry": {
                "bucket": "bench-blockferry",
                "env": env | {"BLOCKFERRY_CACHE_DIR": str(work / "bf-cache")},
                "init": [str(py), "-m", "blockferry", "init", bf_url, "--create-bucket"],
                "backup": lambda data, gen, hints: [str(py), "-m", "blockferry", "backup", bf_url,
                                                    *sorted(str(p) for p in data.glob("*.img")), "--name", "fleet",
                                                    "-q", *[x for p in sorted(data.glob("*.img")) if gen and p.name in hints
                                                            for x in ("--changed-extents", f"{p}={hints[p.name]}")]],
                "restore": lambda out: [str(py), "-m", "blockferry", "restore", bf_url, "latest", "--to", str(out), "-q"],
            },
            "restic": {
                "bucket": "bench-restic",
                "env": env | {"RESTIC_PASSWORD": "bench", "RESTIC_CACHE_DIR": str(work / "restic-cache"),
                              "RESTIC_REPOSITORY": f"s3:{rgw.endpoint}/bench-restic/fleet"},
                "init": [restic, "init", "-q", "--repository-version", "2"],
                "backup": lambda data, gen, hints: [restic, "backup", "-q", "--compression", "auto", "."],
                "restore": lambda out: [restic, "restore", "-q", "latest", "--target", str(out)],
            },
        }
        shutil.rmtree(work / "bf-cache", ignore_errors=True)
        shutil.rmtree(work / "restic-cache", ignore_errors=True)
        hints = {p.name.removesuffix(".hints"): p for p in (fleet / "gen1").glob("*.hints")}
        data = work / "data"
        results: dict[str, dict[str, Any]] = {"full": {}, "incremental": {}, "restore": {}}

        def counted(tool: str, cmd: list[str], cwd: Path) -> dict[str, Any]:
            before = rgw.usage().get(tools[tool]["bucket"], {})
            r = run_measured(cmd, cwd=cwd, env=tools[tool]["env"])
            time.sleep(2.5)  # the usage log is flushed every second
            after = rgw.usage().get(tools[tool]["bucket"], {})
            ops = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}
            puts = sum(v for k, v in ops.items() if k in PUT_KINDS or k.startswith("put_obj"))
            gets = sum(v for k, v in ops.items() if k in GET_KINDS)
            return {"wall": r.wall, "cpu": r.cpu, "rss": r.rss, "requests": sum(ops.values()), "puts": puts,
                    "gets": gets, "requests_per_gib": sum(ops.values()) / (disk_bytes / GiB), "by_kind": ops}

        for name, t in tools.items():
            r = subprocess.run(t["init"], env=t["env"], capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"{name} init failed: {r.stderr}")
        for step, gen in (("full", 0), ("incremental", 1)):
            link_generation(fleet / f"gen{gen}", data)
            for name, t in tools.items():
                log(f"{step}: {name}")
                results[step][name] = counted(name, t["backup"](data, gen, hints), data)
        out = work / "restore"
        originals = {p.name: p for p in (fleet / "gen1").glob("*.img")}
        for name, t in tools.items():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            log(f"restore: {name}")
            results["restore"][name] = counted(name, t["restore"](out), out)
            restored = {p.name: p for p in out.rglob("*.img")}
            results["restore"][name]["bit_exact"] = sorted(restored) == sorted(originals) and all(
                same_content(restored[n], p) for n, p in originals.items())
        shutil.rmtree(out, ignore_errors=True)
    finally:
        rgw.stop()
        shutil.rmtree(rgw.root, ignore_errors=True)

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
            "fewer_requests": all(results[s]["blockferry"]["requests"] < results[s]["restic"]["requests"]
                                  for s in results),
            "incremental_10x": ratio("incremental", "wall") >= 10.0,
            "incremental_speedup": ratio("incremental", "wall"),
        },
    }
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(res, indent=2))
    print(f"{'step':12} {'tool':11} {'wall s':>8} {'requests':>9} {'PUTs':>6} {'GETs':>6} {'req/GiB':>8}")
    for step, by_tool in results.items():
        for tool, r in by_tool.items():
            print(f"{step:12} {tool:11} {r['wall']:8.2f} {r['requests']:9d} {r['puts']:6d} {r['gets']:6d} "
                  f"{r['requests_per_gib']:8.1f}" + ("" if r.get("bit_exact", True) else "  NOT BIT-EXACT"))
    print(json.dumps(res["targets"]))
    print(f"results: {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
