"""CLI commands of instant recovery and VM disks: ``serve`` (a point over NBD) and
``restore-image`` (a point's disk into a qcow2/raw image or an NBD target)."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from typing import Any

import anyio
import msgspec
from blockferry.api import open_repository
from blockferry.cli.core import EXIT_DAMAGED, EXIT_OK, Number, json_out, print_restored
from blockferry.restore.image import restore_image
from blockferry.restore.serve import serve_repository


def register(command: Callable[..., argparse.ArgumentParser]) -> None:
    sp = command("serve", cmd_serve, "serve a restore point's disks over NBD until interrupted (instant recovery)")
    sp.add_argument("repo")
    sp.add_argument("point", help="point id, a unique prefix, or 'latest'")
    sp.add_argument("--disk", metavar="NAME", help="only this disk (also the default export)")
    sp.add_argument("--socket", required=True, metavar="PATH", help="Unix socket to listen on")
    sp.add_argument("--writable", action="store_true",
                    help="accept writes, kept in a temporary overlay (never in the repository; gone on exit)")
    sp.add_argument("--cache", type=Number(int, 0, 1 << 40, size=True), default=64 << 20, metavar="SIZE",
                    help="decoded blocks kept in memory (default 64MiB)")

    sp = command("restore-image", cmd_restore_image,
                 "restore one disk of a point into a qcow2 or raw image, a block device, or an NBD export")
    sp.add_argument("repo")
    sp.add_argument("point")
    sp.add_argument("target", help="image path (created if missing: qcow2 by the .qcow2 suffix or --format), "
                                   "or nbd+unix:///EXPORT?socket=PATH / nbd://HOST:PORT/EXPORT")
    sp.add_argument("--disk", metavar="NAME", help="the disk to restore (needed when the point has several)")
    sp.add_argument("--format", choices=["qcow2", "raw"], help="format of a new image")
    sp.add_argument("--allow-damaged", action="store_true", help="write damaged blocks as zeros and report them")


async def cmd_serve(a: argparse.Namespace) -> int:
    async with open_repository(a.repo) as repo:
        m = await repo.point(a.point)
        names = [a.disk] if a.disk else [d.name for d in m.disks]
        async with anyio.create_task_group() as tg:
            await tg.start(lambda task_status: serve_repository(repo, m.id, a.socket, disk=a.disk,
                                                                writable=a.writable, cache_bytes=a.cache,
                                                                task_status=task_status))
            exports = {n: f"nbd+unix:///{n}?socket={a.socket}" for n in names}
            if len(names) == 1:
                exports[""] = f"nbd+unix:///?socket={a.socket}"
            if a.json:
                # one line: a program waiting for the export reads it as soon as clients can connect
                print(msgspec.json.encode({"point": m.id, "socket": a.socket, "writable": a.writable,
                                           "exports": exports}).decode(), flush=True)
            else:
                print(f"serving point {m.id} ({'writable, writes kept in a temporary overlay' if a.writable else 'read-only'})")
                for n in names:
                    print(f"  {n}: {exports[n]}")
                print("interrupt (Ctrl-C) to stop", flush=True)
            sys.stdout.flush()
            # a signal ends serving cleanly: clients are disconnected, the socket file removed
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    tg.cancel_scope.cancel()
                    break
    return EXIT_OK


async def cmd_restore_image(a: argparse.Namespace) -> int:
    async with open_repository(a.repo) as repo:
        r = await restore_image(repo, a.point, a.target, disk=a.disk, fmt=a.format, allow_damaged=a.allow_damaged)
    if a.json:
        json_out(r)
    else:
        print_restored(r)
    return EXIT_DAMAGED if r.damaged_ranges else EXIT_OK


__all__: list[Any] = ["register"]
