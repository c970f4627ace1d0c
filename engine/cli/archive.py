"""CLI command of the archive tier: ``blockferry archive``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from blockferry.api import open_repository
from blockferry.cli.core import EXIT_OK, Number, json_out


def register(command: Callable[..., argparse.ArgumentParser]) -> None:
    sp = command("archive", cmd_archive,
                 "move the packs of old restore points to an archive storage class (s3), or back")
    sp.add_argument("repo")
    sp.add_argument("--older-than", type=Number(float, 0, 36500), metavar="DAYS",
                    help="points created more than DAYS days ago")
    sp.add_argument("--point", action="append", metavar="ID", help="this point (repeatable)")
    sp.add_argument("--storage-class", metavar="CLASS",
                    help="the archive class (default: the archive_class setting, GLACIER)")
    sp.add_argument("--back", action="store_true", help="move the packs back to STANDARD (restoring them first)")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress")


async def cmd_archive(a: argparse.Namespace) -> int:
    def say(text: str) -> None:
        if not (a.quiet or a.json):
            print(text, file=sys.stderr)

    async with open_repository(a.repo) as repo:
        report = await repo.archive(older_than_days=a.older_than, points=a.point, storage_class=a.storage_class,
                                    back=a.back, progress=say)
    if a.json:
        json_out(report)
        return EXIT_OK
    print(f"{len(report.points)} point(s): {report.packs_moved} pack(s) moved to {report.storage_class}, "
          f"{report.packs_already} already there, {report.packs_shared} kept (newer points use them), "
          f"{report.packs_locked} kept (object lock), in {report.duration:.2f} s")
    return EXIT_OK
