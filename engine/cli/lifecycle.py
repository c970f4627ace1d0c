"""CLI commands of the repository lifecycle: prune, gc, delete, copy, repair."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from blockferry.cli.core import EXIT_FAILED, EXIT_OK, FRACTION, KEEP, SECONDS, _json_out


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
    from blockferry.errors import ConfigError
    from blockferry.repo.retention import RetentionPolicy

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
    from blockferry.api import open_repository

    policy = _policy(a)
    async with open_repository(a.repo) as repo:
        report = await repo.prune(policy, object=a.object, dry_run=a.dry_run)
    if a.json:
        _json_out(report)
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
    from blockferry.api import open_repository

    async with open_repository(a.repo) as repo:
        report = await repo.gc(rewrite_threshold=a.rewrite_threshold, wait=a.wait,
                               progress=None if a.json else (lambda s: print(s, file=sys.stderr)))
    deferred = report.state == "deferred"  # exit 1: the space is not back yet
    if a.json:
        _json_out(report)
    else:
        print(f"collection deferred: {report.reason}" if deferred else report.summary())
    return EXIT_FAILED if deferred else EXIT_OK


async def cmd_delete(a: argparse.Namespace) -> int:
    from blockferry.api import open_repository

    removed = []
    async with open_repository(a.repo) as repo:
        for p in a.points:
            removed.append(await repo.delete(p))
    if a.json:
        _json_out({"removed": removed})
    else:
        for p in removed:
            print(f"removed point {p} (its data is freed by the next gc)")
    return EXIT_OK


async def cmd_copy(a: argparse.Namespace) -> int:
    from blockferry.api import open_repository

    async with open_repository(a.source) as repo:
        report = await repo.copy_to(a.target, a.point, latest=a.latest, retention=_policy(a, required=False))
    if a.json:
        _json_out(report)
        return EXIT_OK
    print(f"{report.summary()}, in {report.duration:.2f} s")
    if report.pruned:
        print(f"the target's retention removed {len(report.pruned)} point(s): {', '.join(report.pruned)}")
    return EXIT_OK


async def cmd_repair(a: argparse.Namespace) -> int:
    from blockferry.api import open_repository
    from blockferry.cli.core import EXIT_DAMAGED

    async with open_repository(a.repo) as repo:
        report = await repo.repair()
    if a.json:
        _json_out(report)
    else:
        print(f"index rebuilt from {report.packs} pack(s): {report.chunks} chunk(s) in {report.duration:.2f} s")
        for u in report.unreadable:
            print(f"unreadable pack {u.pack}: {u.reason}")
        for x in report.affected:
            print(f"  point {x.point} ({x.object}) disk {x.disk}: {x.damaged_blocks} block(s) lost, "
                  f"at {', '.join(str(o) for o in x.offsets)}")
    return EXIT_DAMAGED if report.unreadable or report.missing_chunks else EXIT_OK
