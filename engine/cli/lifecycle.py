"""CLI commands of the repository lifecycle: prune, gc, delete, copy, repair."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from blockferry.api import open_repository
from blockferry.cli.core import EXIT_DAMAGED, EXIT_FAILED, EXIT_OK, FRACTION, KEEP, SECONDS, json_out
from blockferry.errors import ConfigError
from blockferry.repo.gc import GcReport
from blockferry.repo.lifecycle import CopyReport
from blockferry.repo.retention import RetentionPolicy
from blockferry.units import human


def register(command: Callable[..., argparse.ArgumentParser]) -> None:
    sp = command("prune", cmd_prune, "remove the restore points a retention policy does not keep")
    sp.add_argument("repo")
    _keep_arguments(sp, "keep")
    sp.add_argument("--object", help="only this object's points")
    sp.add_argument("--dry-run", action="store_true", help="say what would go and why the rest stays")

    sp = command("gc", cmd_gc, "free the space of chunks no restore point uses")
    sp.add_argument("repo")
    sp.add_argument("--rewrite-threshold", type=FRACTION, default=0.5, metavar="F",
                    help="rewrite packs whose unused share is at least F (0.5)")
    sp.add_argument("--wait", type=SECONDS, default=0.0, metavar="SECONDS",
                    help="wait this long for backups and readers that started earlier (default: defer)")

    sp = command("delete", cmd_delete, "remove restore points (never an immutable one)")
    sp.add_argument("repo")
    sp.add_argument("points", nargs="+", metavar="POINT")

    sp = command("repair", cmd_repair, "rebuild the index from the packs")
    sp.add_argument("repo")

    sp = command("copy", cmd_copy, "copy restore points to another repository (only missing chunks travel)")
    sp.add_argument("source")
    sp.add_argument("target")
    which = sp.add_mutually_exclusive_group()
    which.add_argument("--point", action="append", metavar="ID", help="this point (repeatable; default: all)")
    which.add_argument("--latest", action="store_true",
                       help="the newest point of each object (what a periodic copy sends)")
    _keep_arguments(sp, "then keep in the target")


_RULES = (("last", "the N newest points of each object"),
          ("days", "every point within N days of the object's newest"),
          ("daily", "the newest point of each of the last N days with points"),
          ("weekly", "the newest point of each of the last N weeks with points"),
          ("monthly", "the newest point of each of the last N months with points"),
          ("yearly", "the newest point of each of the last N years with points"))


def _keep_arguments(sp: argparse.ArgumentParser, verb: str) -> None:
    for rule, what in _RULES:
        sp.add_argument(f"--keep-{rule}", type=KEEP, metavar="N", help=f"{verb} {what}")


def _policy(a: argparse.Namespace, *, required: bool = True) -> Any:
    rules = {f"keep_{r}": getattr(a, f"keep_{r}") for r, _ in _RULES}
    if all(v is None for v in rules.values()):
        if not required:
            return None
        raise ConfigError("say what to keep: --keep-last N, --keep-days N, --keep-weekly N...")
    for k, v in rules.items():
        if v is not None and v < 1:
            raise ConfigError(f"--{k.replace('_', '-')} must be 1 or more")
    return RetentionPolicy(**rules)


async def cmd_prune(a: argparse.Namespace) -> int:
    policy = _policy(a)
    async with open_repository(a.repo) as repo:
        report = await repo.prune(policy, object=a.object, dry_run=a.dry_run)
    if a.json:
        json_out(report)
        return EXIT_OK
    verb = "would remove" if a.dry_run else "removed"
    for d in report.decisions:
        mark = "keep  " if d.keep else ("remove" if a.dry_run else "gone  ")
        why = "; ".join(d.reasons) if d.keep else "no rule keeps it"
        print(f"{mark} {d.point}  {d.created[:19].replace('T', ' ')}  {d.object:20}  {why}")
    for r in report.refused:
        print(f"kept   {r.point}: {r.reason}")
    gone = sum(not d.keep for d in report.decisions)
    print(f"{verb} {gone} of {len(report.decisions)} points ({report.policy})")
    return EXIT_OK


async def cmd_gc(a: argparse.Namespace) -> int:
    async with open_repository(a.repo) as repo:
        report = await repo.gc(rewrite_threshold=a.rewrite_threshold, wait=a.wait,
                               progress=None if a.json else (lambda s: print(s, file=sys.stderr)))
    deferred = report.state == "deferred"  # exit 1: the space is not back yet
    if a.json:
        json_out(report)
    else:
        print(f"collection deferred: {report.reason}" if deferred else gc_summary(report))
    return EXIT_FAILED if deferred else EXIT_OK


def gc_summary(report: GcReport) -> str:
    text = (f"{report.state}: {human(report.bytes_freed)} freed; {report.packs_deleted} pack(s) deleted, "
            f"{report.packs_rewritten} rewritten into {report.packs_written}, {report.chunks_removed} chunk(s) "
            f"removed, {report.orphan_packs_deleted} orphan pack(s)")
    if report.packs_kept_immutable:
        text += f"; {report.packs_kept_immutable} pack(s) kept for immutable points"
    if report.orphan_packs_kept:
        text += (f"; {report.orphan_packs_kept} pack(s) no index lists kept: they hold chunks points use "
                 "(run 'blockferry repair')")
    if report.packs_kept_live:
        text += f"; {report.packs_kept_live} pack(s) kept: they hold chunks points use"
    for n in report.notes:
        text += f"; {n}"
    return text


async def cmd_delete(a: argparse.Namespace) -> int:
    removed = []
    async with open_repository(a.repo) as repo:
        for p in a.points:
            removed.append(await repo.delete(p))
    if a.json:
        json_out({"removed": removed})
    else:
        for p in removed:
            print(f"removed point {p} (its data is freed by the next gc)")
    return EXIT_OK


async def cmd_copy(a: argparse.Namespace) -> int:
    async with open_repository(a.source) as repo:
        report = await repo.copy_to(a.target, a.point, latest=a.latest, retention=_policy(a, required=False))
    if a.json:
        json_out(report)
        return EXIT_OK
    print(f"{copy_summary(report)}, in {report.duration:.2f} s")
    if report.pruned:
        print(f"the target's retention removed {len(report.pruned)} point(s): {', '.join(report.pruned)}")
    return EXIT_OK


def copy_summary(report: CopyReport) -> str:
    return (f"copied {len(report.points)} point(s) ({len(report.skipped)} already there): "
            f"{report.chunks_copied} chunk(s) sent ({human(report.bytes_written)}), "
            f"{report.chunks_present} already present")


async def cmd_repair(a: argparse.Namespace) -> int:
    async with open_repository(a.repo) as repo:
        report = await repo.repair()
    if a.json:
        json_out(report)
    else:
        print(f"index rebuilt from {report.packs} pack(s): {report.chunks} chunk(s) in {report.duration:.2f} s")
        for k in report.damaged_index_files:
            print(f"damaged index file {k}: replaced")
        for s in report.salvaged:
            print(f"damaged pack {s.pack}: {s.reason}; {s.salvaged} chunk(s) salvaged into a new pack, "
                  f"{s.lost} lost" + ("" if s.removed else " (the damaged pack could not be removed)"))
        for u in report.unreadable:
            print(f"unreadable pack {u.pack}: {u.reason} (its index entries are kept; run repair again once it "
                  "can be read)")
        for x in report.affected:
            print(f"  point {x.point} ({x.object}) disk {x.disk}: {x.damaged_blocks} block(s) lost, "
                  f"at {', '.join(str(o) for o in x.offsets)}")
        if report.health_rebuilt:
            print("the damaged health record was written again by a full check"
                  + ("" if report.verify is None or not report.verify.has_damage else ": damage remains "
                     "(see 'blockferry verify')"))
    if report.missing_chunks or any(s.lost for s in report.salvaged) or (
            report.verify is not None and report.verify.has_damage):
        return EXIT_DAMAGED
    return EXIT_FAILED if report.unreadable else EXIT_OK
