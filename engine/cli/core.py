"""The ``blockferry`` command.

Embedded commands (no daemon needed): ``init``, ``backup``, ``points``, ``restore``, ``verify``,
``unlock`` and ``demo``. Each takes ``--json`` for machine-readable output on stdout. Progress
goes to stderr: a redrawn line on a terminal, plain lines otherwise.

Exit codes: 0 success; 1 the operation failed (a backup session failed, an I/O error, a
collection deferred, the output's reader went away); 2 bad input (arguments, configuration,
missing source or point); 3 damaged data found; 4 the repository is locked by another process;
5 a removal was refused because the point is immutable.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import importlib
import math
import os
import select
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import anyio
import msgspec
from blockferry import __version__
from blockferry.api import init_repository, open_repository
from blockferry.errors import BlockferryError, ConfigError, unwrap_group
from blockferry.jobs.messages import JobStatus
from blockferry.log import configure, get_logger, quiet_cli_defaults
from blockferry.registry import scheme_of
from blockferry.repo.format import COMPRESSION_LEVELS, DEFAULT_BLOCK_SIZE, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, stats_dict
from blockferry.units import human, parse_size

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_DAMAGED, EXIT_LOCKED, EXIT_IMMUTABLE = 0, 1, 2, 3, 4, 5

#: modules that add commands, each with ``register(add_command)`` where ``add_command(name, fn,
#: help)`` returns the subparser, and the commands each adds (a test keeps this list true). Only
#: the module of the command being run is imported (see :func:`build_parser`), so each imports
#: what its commands need at its top: ``blockferry backup`` never loads the daemon or the restore.
COMMAND_MODULES: dict[str, tuple[str, ...]] = {
    "blockferry.cli.lifecycle": ("prune", "gc", "delete", "repair", "copy"),
    "blockferry.cli.recovery": ("serve", "restore-image"),
    "blockferry.cli.archive": ("archive",),
    "blockferry.cli.daemon": ("daemon", "status", "repo", "proxy", "source", "job", "session", "config",
                              "settings", "clock"),
    "blockferry.cli.demo": ("demo",),
}
CORE_COMMANDS = ("init", "backup", "points", "restore", "verify", "unlock")


def shown(name: str) -> str:
    """A name as printed for people: control characters (a newline would forge a line of the
    listing) escaped as in Python; names made before names were checked may hold them."""
    return name if name.isprintable() else name.encode("unicode_escape").decode("ascii")


def json_out(obj: Any) -> None:
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(obj), indent=2).decode() + "\n")


class Progress:
    """Progress on stderr: one redrawn line on a terminal, a plain line every ``every`` seconds
    otherwise, nothing with ``quiet``."""

    def __init__(self, *, quiet: bool, every: float = 10.0) -> None:
        self.tty = sys.stderr.isatty()
        self.quiet = quiet
        self.every = every
        self._last = 0.0
        self._started = time.monotonic()
        self._drawn = False

    def line(self, text: str, *, final: bool = False) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        if self.tty:
            sys.stderr.write("\r\x1b[2K" + text + ("\n" if final else ""))
            sys.stderr.flush()
            self._drawn = not final
        elif final or now - self._last >= self.every:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
            self._last = now

    def done(self) -> None:
        if self.tty and self._drawn and not self.quiet:
            sys.stderr.write("\n")
            self._drawn = False

    def bar(self, done: int, total: int, extra: str = "") -> str:
        frac = done / total if total else 1.0
        width = 24
        fill = int(frac * width)
        rate = done / max(1e-9, time.monotonic() - self._started)
        return f"[{'#' * fill}{'.' * (width - fill)}] {frac * 100:5.1f}% {human(done)}/{human(total)} {human(rate)}/s {extra}"


# -- commands ------------------------------------------------------------------------------------


async def cmd_init(a: argparse.Namespace) -> int:
    options = {}
    if a.create_bucket or a.object_lock:
        if scheme_of(a.repo) != "s3":
            raise ConfigError("--create-bucket and --object-lock are for s3:// repositories")
        options = {"create_bucket": True, "object_lock": a.object_lock}
    cfg = await init_repository(a.repo, block_size=a.block_size, compression=a.compression,
                                immutable_days=a.immutable_days, backend_options=options)
    if a.json:
        json_out({"repository": a.repo, "config": cfg})
    else:
        print(f"created repository {a.repo} (id {cfg.id[:12]}, block size {human(cfg.block_size)}, "
              f"compression {cfg.compression})")
    return EXIT_OK


def _parse_hints(items: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        src, sep, path = item.rpartition("=")
        if not sep or not src or not path:
            raise ConfigError(f"--changed-extents takes SOURCE=FILE, not {item!r}")
        out[src] = path
    return out


async def cmd_backup(a: argparse.Namespace) -> int:
    progress = Progress(quiet=a.json or a.quiet)
    seen: dict[str, str] = {}

    def show(st: JobStatus) -> None:
        for t in st.tasks:  # plain lines for state changes, on every kind of output
            if seen.get(t.disk) != t.state and not progress.tty:
                seen[t.disk] = t.state
                progress.line(f"{t.object}/{t.disk}: {t.state}" + (f" on proxy {t.proxy}" if t.proxy else ""), final=True)
        done = sum(t.done_bytes for t in st.tasks)
        total = sum(t.total_bytes for t in st.tasks)
        running = sum(t.state == "running" for t in st.tasks)
        waiting = sum(t.state == "waiting" for t in st.tasks)
        progress.line(progress.bar(done, total, f"disks: {running} running, {waiting} waiting"))

    hints = _parse_hints(a.changed_extents)
    async with open_repository(a.repo, max_tasks=a.max_tasks, prepare=hints) as repo:
        session = await repo.backup(a.sources, name=a.name, hints=hints,
                                    retries=a.retries, immutable_days=a.immutable_days, progress=show)
    progress.done()
    if a.json:
        out = msgspec.to_builtins(session)
        out["stats"] = stats_dict(session.stats)
        for o, oo in zip(session.objects, out["objects"]):
            for d, dd in zip(o.disks, oo["disks"]):
                dd["stats"] = stats_dict(d.stats)
        json_out(out)
    else:
        print_session(session)
    return EXIT_OK if session.state in ("success", "warning") else EXIT_FAILED


def print_session(session: Any) -> None:
    for o in session.objects:
        if o.state == "done":
            print(f"{shown(o.name)}: restore point {o.point} ({len(o.disks)} disk{'s' * (len(o.disks) != 1)})")
        else:
            print(f"{shown(o.name)}: FAILED after {o.attempts} attempt(s): {o.error}")
        for d in o.disks:
            s = d.stats
            if d.state != "done":
                print(f"  {shown(d.name)}: {d.state}" + (f": {d.error}" if d.error else ""))
                continue
            bn = s.bottleneck()
            worst = max(bn, key=lambda k: bn[k])
            print(f"  {shown(d.name)}: {human(s.disk_size)} in {s.duration:.2f} s ({human(s.rate())}/s) "
                  f"via proxy {d.proxy}; {d.plan}")
            print(f"    read {human(s.read_bytes)}, zero {human(s.zero_bytes)}, unchanged {human(s.unchanged_bytes)}, "
                  f"new {human(s.new_bytes)}, deduplicated {human(s.dedup_bytes)}, "
                  f"compressed {human(s.compressed_bytes)}, written {human(s.written_bytes)}")
            print(f"    busy: source {bn['source']:.0%}, proxy {bn['proxy']:.0%}, target {bn['target']:.0%} "
                  f"(bottleneck: {worst})")
    s = session.stats
    print(f"session {session.state}: {human(s.disk_size)} covered in {session.duration:.2f} s, "
          f"{human(s.read_bytes)} read, {human(s.written_bytes)} written")
    for w in session.warnings:
        print(f"warning: {w}")


async def cmd_points(a: argparse.Namespace) -> int:
    async with open_repository(a.repo) as repo:
        pts = await repo.points(object=a.object)
    if a.json:
        json_out(pts)
        return EXIT_OK
    if not pts:
        print("no restore points")
        return EXIT_OK
    print(f"{'ID':16}  {'CREATED (UTC)':19}  {'OBJECT':20}  DISKS")
    for p in pts:
        if p.error:
            print(f"{shown(p.id):16}  {'?':19}  {'?':20}  [DAMAGED: {p.error}]")
            continue
        disks = ", ".join(f"{shown(d.name)} ({human(d.size)}{', incremental' if d.hinted else ''})" for d in p.disks)
        flags = "".join(f" [{f}]" for f, on in (("DAMAGED", p.damaged), ("immutable", bool(p.immutable_until)))
                        if on)
        print(f"{p.id:16}  {p.created[:19].replace('T', ' '):19}  {shown(p.object)[:20]:20}  {disks}{flags}")
    return EXIT_OK


async def cmd_restore(a: argparse.Namespace) -> int:
    if (a.to is None) == (a.to_file is None):
        raise ConfigError("give either --to DIR or --to-file PATH")
    progress = Progress(quiet=a.json or a.quiet, every=10.0)
    async with open_repository(a.repo) as repo:
        if not a.json:  # waits for an archive tier are worth saying, even with -q
            repo.archive_progress = lambda text: print(text, file=sys.stderr, flush=True)
        m = await repo.point(a.point)
        disks = [m.disk(a.disk)] if a.disk else m.disks
        total = sum(d.size for d in disks)
        done = [0]

        def tick(n: int) -> None:
            done[0] += n
            progress.line(progress.bar(done[0], total))

        if a.to_file is not None:
            results = [await repo.restore_onto(m.id, a.to_file, disk=a.disk, progress=tick)]
        else:
            results = await repo.restore(m.id, a.to, disk=a.disk, overwrite=a.overwrite,
                                         allow_damaged=a.allow_damaged, progress=tick)
    progress.done()
    if a.json:
        json_out(results)
    else:
        for r in results:
            print_restored(r)
    return EXIT_DAMAGED if any(r.damaged_ranges for r in results) else EXIT_OK


def print_restored(r: Any) -> None:
    """The lines of one restored disk (a RestoreResult)."""
    print(f"restored {r.disk} of point {r.point} to {r.path}: {human(r.size)} "
          f"({human(r.data_bytes)} data, {human(r.hole_bytes)} holes) in {r.duration:.2f} s")
    for off, n in r.damaged_ranges:
        print(f"  DAMAGED: {human(n)} at offset {off} written as zeros")


async def cmd_verify(a: argparse.Namespace) -> int:
    progress = Progress(quiet=a.json or a.quiet)
    async with open_repository(a.repo) as repo:
        report = await repo.verify(sample=a.sample,
                                   progress=lambda n, total: progress.line(f"verified {n}/{total} chunks"))
    progress.done()
    if a.json:
        out = msgspec.to_builtins(report)
        out["healthy"] = report.healthy
        json_out(out)
    else:
        print(f"{report.points} points, {report.chunks_checked} chunks ({human(report.bytes_checked)}) checked "
              f"in {report.duration:.2f} s")
        for f in report.damaged_files:
            print(f"damaged {f.key}: {f.reason}")
        for d in report.damaged:
            print(f"damaged chunk {d.chunk[:16]}{' in ' + d.pack if d.pack else ''}: {d.reason}")
        for x in report.affected:
            if x.damaged_blocks < 0:
                print(f"  point {x.point}: its manifest is damaged (it cannot be restored; delete it, or put "
                      "back a copy of its manifest)")
                continue
            offs = ", ".join(str(o) for o in x.offsets)
            print(f"  affects point {x.point} ({x.object}) disk {x.disk}: {x.damaged_blocks} block(s) at {offs}")
        for f in report.unreadable:
            print(f"unreadable {f.key}: {f.reason} (not recorded as damage; verify again once it can be read)")
        if report.cleared:
            print(f"{report.cleared} chunk copy(ies) marked damaged read back correctly: the mark is cleared")
        for n in report.notes:
            print(f"note: {n}")
        if report.has_damage:
            print("repository is DAMAGED")
        elif report.unreadable:
            print("check incomplete: some objects could not be read")
        else:
            print("repository is healthy")
    if report.has_damage:
        return EXIT_DAMAGED
    return EXIT_FAILED if report.unreadable else EXIT_OK


async def cmd_unlock(a: argparse.Namespace) -> int:
    async with open_repository(a.repo) as repo:
        holder = await repo.break_lock()
    if holder is None:
        print("the repository is not locked")
    else:
        print(f"removed the lock of pid {holder.pid} on {holder.host} ({holder.purpose}, since {holder.created})")
    return EXIT_OK


# -- wiring --------------------------------------------------------------------------------------


class Number:
    """The argparse type of every numeric option: an ``int`` or ``float`` (or with ``size`` a size
    such as 64MiB) within ``low``..``high`` (``low`` itself excluded with ``above``). NaN, the
    infinities and anything out of range are refused while parsing (exit 2), before anything
    starts: a limit of 0 tasks would wait forever for a slot, 1e400 days overflow a date."""

    def __init__(self, kind: type[int] | type[float], low: float | None = None, high: float | None = None, *,
                 above: bool = False, size: bool = False) -> None:
        self.kind = kind
        self.low = low
        self.high = high
        self.above = above
        self.size = size
        self.__name__ = "size" if size else kind.__name__  # what argparse calls it in messages

    def __repr__(self) -> str:
        return f"Number({self.__name__} {self.range()})"

    def range(self) -> str:
        def show(v: float) -> str:
            if self.size:  # the largest unit that divides it: 256 KiB, 8 MiB
                n, unit = int(v), "bytes"
                for u in ("KiB", "MiB", "GiB", "TiB", "PiB"):
                    if n and n % 1024 == 0:
                        n, unit = n // 1024, u
                return f"{n} {unit}"
            return f"{int(v):,}".replace(",", "_") if float(v).is_integer() else f"{v:g}"

        low = None if self.low is None else ("more than " if self.above else "") + show(self.low)
        if low is not None and self.high is not None:
            return f"{low} to {show(self.high)}" if not self.above else f"{low} and at most {show(self.high)}"
        if low is not None:
            return low if self.above else f"{low} or more"
        return f"at most {show(self.high)}" if self.high is not None else "any number"

    def __call__(self, text: str) -> int | float:
        what = "a size" if self.size else ("a whole number" if self.kind is int else "a number")
        try:
            value: int | float = parse_size(text) if self.size else self.kind(text.strip())
        except (ValueError, ConfigError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what} (give {self.range()})")
        if ((self.low is not None and (value < self.low or (self.above and value == self.low)))
                or (self.high is not None and value > self.high)):
            raise argparse.ArgumentTypeError(f"{text!r} is out of range: give {self.range()}")
        return value


#: the ranges shared by several commands
TASKS = Number(int, 1, 1024)
RETRIES = Number(int, 0, 100)
DAYS = Number(int, 1, 36500)  #: immutability, in days (up to a hundred years)
KEEP = Number(int, 1, 1_000_000)
PERCENT = Number(float, 0, 100, above=True)
FRACTION = Number(float, 0, 1)
SECONDS = Number(float, 0, 30 * 86400)
SESSION_ID = Number(int, 1, 2**63 - 1)
BLOCK_SIZE = Number(int, MIN_BLOCK_SIZE, MAX_BLOCK_SIZE, size=True)  #: a power of two, checked by init


class _Unbuilt:
    """Stands in for the parser of a command that is not being run, so that its arguments are
    not built: every call is accepted and ignored."""

    def __getattr__(self, name: str) -> Callable[..., _Unbuilt]:
        return self._ignore

    def _ignore(self, *args: Any, **kwargs: Any) -> _Unbuilt:
        return self


def command_in(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names, if it names a known one after the global options."""
    args = iter(argv)
    for arg in args:
        if arg == "--async-backend":
            next(args, None)
        elif not arg.startswith("-"):
            known = arg in CORE_COMMANDS or any(arg in names for names in COMMAND_MODULES.values())
            return arg if known else None
        elif arg == "--":
            return None
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or with ``only`` the parser of that command alone: the others' arguments
    (and the modules adding them) are skipped, which saves about a tenth of a second on every
    start, a tenth of an incremental backup."""
    p = argparse.ArgumentParser(prog="blockferry", description="Image-level backup of VM disks and volumes.")
    p.add_argument("--version", action="version", version=f"blockferry {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    p.add_argument("--log-json", action="store_true", help="log JSON lines to stderr")
    p.add_argument("--async-backend", choices=("asyncio", "trio"), default=os.environ.get("BLOCKFERRY_ASYNC", "asyncio"),
                   help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name: str, fn: Callable[[argparse.Namespace], Any], help: str) -> argparse.ArgumentParser:
        if only is not None and name != only:
            return _Unbuilt()  # type: ignore[return-value]
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(fn=fn)
        sp.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        return sp

    sp = cmd("init", cmd_init, "create a repository")
    sp.add_argument("repo", help="directory (created if missing) or URL")
    sp.add_argument("--block-size", type=BLOCK_SIZE, default=DEFAULT_BLOCK_SIZE,
                    help="block size, a power of two from 256KiB to 8MiB (default 1MiB)")
    sp.add_argument("--compression", choices=list(COMPRESSION_LEVELS), default="default",
                    help="none, fast (zstd 1), default (zstd 3), high (zstd 9)")
    sp.add_argument("--immutable-days", type=DAYS, metavar="N", help="every point stays immutable N days")
    sp.add_argument("--create-bucket", action="store_true", help="s3: create the bucket if it does not exist")
    sp.add_argument("--object-lock", action="store_true",
                    help="s3: create the bucket with object lock (immutable points are locked by the server)")

    sp = cmd("backup", cmd_backup, "back up the disks of one object (VM) into a new restore point")
    sp.add_argument("repo")
    sp.add_argument("sources", nargs="+", metavar="SOURCE", help="disk image, block device or source URL")
    sp.add_argument("--name", help="object name (default: the first source's name)")
    sp.add_argument("--changed-extents", action="append", default=[], metavar="SOURCE=FILE",
                    help="only these extents of SOURCE changed since its last point ('OFFSET LENGTH' lines or rbd diff JSON)")
    sp.add_argument("--max-tasks", type=TASKS, default=4, help="disks processed at once (default 4)")
    sp.add_argument("--retries", type=RETRIES, default=2, help="retries of a transient failure (default 2)")
    sp.add_argument("--immutable-days", type=DAYS, metavar="N",
                    help="the point cannot be removed (by prune, gc or delete) for N days")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress")

    sp = cmd("points", cmd_points, "list restore points")
    sp.add_argument("repo")
    sp.add_argument("--object", help="only this object's points")

    sp = cmd("restore", cmd_restore, "restore a point's disks")
    sp.add_argument("repo")
    sp.add_argument("point", help="point id, unique prefix, or 'latest'")
    sp.add_argument("--to", help="directory: one image file per disk, named after the disk")
    sp.add_argument("--to-file", help="an existing image file or block device to overwrite with one disk")
    sp.add_argument("--disk", help="only this disk")
    sp.add_argument("--overwrite", action="store_true", help="replace existing files in --to")
    sp.add_argument("--allow-damaged", action="store_true",
                    help="restore what is good; write damaged ranges as zeros and list them (exit code 3)")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress")

    sp = cmd("verify", cmd_verify, "re-read every chunk (or a sample) and check its hash")
    sp.add_argument("repo")
    sp.add_argument("--sample", type=PERCENT, metavar="PERCENT", help="check only this share of the chunks, at random")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress")

    sp = cmd("unlock", cmd_unlock, "remove the writer lock left by a process that is gone")
    sp.add_argument("repo")

    for module, names in COMMAND_MODULES.items():
        if only is None or only in names:
            importlib.import_module(module).register(cmd)
    return p


def one_malloc_arena() -> bool:
    """Have glibc's malloc keep one arena for all threads; True if it was set here.

    By default every thread that allocates gets an arena of its own, and what the hashing and
    compressing threads free (a compressed block is about 1 MiB) stays in their arenas: a full
    backup of the benchmark fleet peaked at 190-255 MiB that way, and at 160-170 MiB with one
    arena, at the same speed (the threads spend their time in zstd, not in malloc). Only the
    command does this: a program embedding blockferry keeps its allocator as it is
    (``MALLOC_ARENA_MAX=1`` in the environment does the same there). A ``MALLOC_ARENA_MAX``
    already set is left alone. No library wraps ``mallopt``, hence ctypes."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not a C library with mallopt
        return False
    M_ARENA_MAX = -8  # from glibc's malloc.h
    return bool(mallopt(M_ARENA_MAX, 1))


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    one_malloc_arena()  # before any worker thread allocates
    parser = build_parser(command_in(argv))
    a, extra = parser.parse_known_args(argv)
    tail = getattr(a, "extra_positionals", None)  # a command whose last positional is optional
    if extra and (tail is None or any(x.startswith("-") for x in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        getattr(a, tail).extend(extra)
    level = ("warning", "info", "debug")[min(a.verbose, 2)]
    if a.verbose or a.log_json:
        configure(level=level, json=a.log_json)
    else:
        quiet_cli_defaults(level)
    try:
        return anyio.run(a.fn, a, backend=a.async_backend)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BaseException as exc:
        err = unwrap_group(exc)
        if isinstance(err, BlockferryError):  # one line, whatever names the message holds
            print(f"blockferry: error: {shown(str(err))}", file=sys.stderr)
            return err.exit_code
        if isinstance(err, BrokenPipeError) and stdout_unread():  # ``| head`` went away
            return output_closed()
        if isinstance(err, KeyboardInterrupt):
            print("interrupted", file=sys.stderr)
            return 130
        if isinstance(err, (SystemExit, GeneratorExit)):
            raise
        return unexpected(err, verbose=a.verbose > 0)


def unexpected(err: BaseException, *, verbose: bool) -> int:
    """An error no command expected (a bug, or a failure nothing translated): one line for the
    user, never a traceback; with ``-v`` the traceback goes to the log (stderr, or JSON lines with
    ``--log-json``)."""
    lines = (str(err) or "").strip().splitlines()
    print(f"blockferry: error: unexpected {type(err).__name__}" + (f": {lines[0]}" if lines else "")
          + ("" if verbose else " (run with -v to log the details)"), file=sys.stderr)
    if verbose:
        get_logger(command="blockferry").exception("unexpected_error", exc_info=err)
    return EXIT_FAILED


def stdout_unread() -> bool:
    """True when nobody reads stdout any more (a pipe whose reader is gone reports an error to
    ``poll``): a broken pipe elsewhere is not the output's and stays an error of its own."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def output_closed() -> int:
    """The command's output could not be written because its reader is gone: say so on stderr
    (no traceback) and point stdout at /dev/null, so that nothing tries to write it again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError):
        pass
    try:
        print("blockferry: error: the output was closed before it was all written", file=sys.stderr)
    except (OSError, ValueError):
        pass
    return EXIT_FAILED


def run() -> NoReturn:
    """The ``blockferry`` executable: :func:`main`, then :func:`leave` with its exit code.

    Usage errors exit 2 through argparse; unexpected exceptions print one line (see
    :func:`unexpected`)."""
    leave(main())


def leave(code: int) -> NoReturn:
    """Exit the process as the interpreter would, minus tearing it down.

    Python waits for the threads that are not daemons, runs the ``atexit`` handlers and flushes
    the standard streams, then frees every object and module one by one. That last part took
    30 ms at the end of a 0.7 s incremental backup on the benchmark machine (where giving memory
    back is costly): 3 % of the command, measured on interleaved pairs, for memory the kernel
    frees at once on exit. Everything :func:`main` opened is closed by the time it returns; this
    does the first three steps and then ``os._exit``. No library offers it, and the standard
    library runs atexit handlers only through ``atexit._run_exitfuncs``.

    Output that cannot be flushed (its reader is gone) ends with exit status 1, as when a command
    meets that while running; the interpreter would say 120, which is not one of ours."""
    main_thread = threading.main_thread()
    for t in threading.enumerate():
        if t is not main_thread and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except BrokenPipeError:
        code = output_closed()
    except (OSError, ValueError):
        code = EXIT_FAILED
    try:
        if sys.stderr is not None:
            sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(code)


if __name__ == "__main__":
    run()
