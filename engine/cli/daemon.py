"""CLI commands of the daemon: ``daemon`` itself, and the client commands that drive it over the
control socket (``status``, ``repo``, ``proxy``, ``source``, ``job``, ``session``, ``config``,
``settings``, ``clock``). Every client command takes ``--socket PATH`` (default
``$BLOCKFERRY_SOCKET``, else the daemon's default) and ``--json``.

Exit codes add to those of blockferry.cli: 6 no daemon listens on the socket. A refused request
exits with the code of its error (docs/protocol.md): 2 invalid, unknown or conflicting, 4 locked,
5 permission denied, 1 failed. ``job run --wait`` exits 0 only if the session ends ``success``
or ``warning``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from blockferry.cli.core import (
    BLOCK_SIZE,
    DAYS,
    EXIT_FAILED,
    EXIT_OK,
    FRACTION,
    KEEP,
    PERCENT,
    RETRIES,
    SECONDS,
    SESSION_ID,
    TASKS,
    Number,
    json_out,
    shown,
)
from blockferry.daemon.client import connect, default_paths, default_socket
from blockferry.errors import ConfigError, NotFoundError
from blockferry.jobs.calendars import ManualClock, SystemClock, zone
from blockferry.jobs.catalog import JOB_TYPES, load_toml
from blockferry.repo.format import COMPRESSION_LEVELS
from blockferry.runtime.events import EventBus
from blockferry.runtime.settings import EngineSettings
from blockferry.units import human

FINAL = ("success", "warning", "failed", "stopped", "missed", "skipped")


def _socket(a: argparse.Namespace) -> Path:
    return Path(a.socket) if a.socket else default_socket()


def _local(path: str) -> str:
    """A path the daemon (another working directory) can use: absolute, unless it is a URL."""
    return path if "://" in path else os.path.abspath(path)


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _pairs(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"expected KEY=VALUE, not {item!r}")
        out[key] = _value(value)
    return out


async def _call(a: argparse.Namespace, method: str, **params: Any) -> Any:
    async with connect(_socket(a), client="blockferry-cli") as c:
        return await c.call(method, **params)


def _print_table(rows: list[dict[str, Any]], cols: list[str]) -> None:
    if not rows:
        print("(none)")
        return
    cells = [[("-" if r.get(c) is None else str(r.get(c))) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


# -- the daemon --------------------------------------------------------------------------------------


async def cmd_daemon(a: argparse.Namespace) -> int:
    # the daemon's assembly (actors, scheduler, state database, control server): 31 ms of imports
    # on top of this module's, which the client commands (status, job run...) do not need
    from blockferry.daemon.assembly import Daemon, DaemonOptions, configure_logging

    sock, state = default_paths()
    opts = DaemonOptions(
        socket=Path(a.socket or os.environ.get("BLOCKFERRY_SOCKET") or sock).absolute(),
        state_dir=Path(a.state_dir or state).absolute(),
        seed=Path(a.config).absolute() if a.config else None,
        allowed_users=a.allow_user, allowed_groups=a.allow_group, socket_group=a.socket_group,
        max_clients=a.max_clients, max_clients_per_user=a.max_clients_per_user, idle_timeout=a.idle_timeout,
        engine=EngineSettings(), progress_interval=a.progress_interval,
    )
    opts.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    bus = EventBus()
    clock: Any
    if a.manual_clock:
        try:
            clock = ManualClock(dt.datetime.fromisoformat(a.manual_clock))
        except ValueError:
            raise ConfigError(f"--manual-clock takes an ISO 8601 time with a zone, not {a.manual_clock!r}") from None
    else:
        clock = SystemClock(zone(a.timezone))
    daemon = Daemon(opts, clock=clock, bus=bus)
    logfile = configure_logging(opts.state_dir / "daemon.log", level=a.log_level, stderr=not a.quiet, bus=bus)
    try:
        await daemon.run(handle_signals=True)
    finally:
        logfile.close()
    return EXIT_OK


# -- client commands ---------------------------------------------------------------------------------


async def cmd_status(a: argparse.Namespace) -> int:
    st = await _call(a, "status")
    if a.json:
        json_out(st)
        return EXIT_OK
    print(f"{st['version'] if str(st['version']).startswith('blockferry') else 'blockferry ' + st['version']} "
          f"pid {st['pid']}, up {st['uptime']:.0f} s, socket {st['socket']}, state {st['state_dir']}")
    for p in st["server"]["proxies"]:
        print(f"proxy {p.get('name')}: {p.get('load', 0)}/{p.get('max_tasks')} tasks")
    for r in st["server"]["repositories"]:
        print(f"repository {r['name']}: {r['url']} {r['load']}/{r['max_tasks']} tasks, {r['chunks']} chunks")
    for name, why in st["unavailable"].items():
        print(f"repository {name}: unavailable ({why})")
    for run in st["scheduler"]["running"]:
        prog = run.get("progress") or {}
        print(f"running: job {run['job']} session {run['session']} ({run['trigger']}) "
              + (f"{prog['kind']}: {prog.get('step') or 'starting'}" if "kind" in prog else
                 f"{human(prog.get('done_bytes', 0))}/{human(prog.get('total_bytes', 0))}"))
    for n in st["scheduler"]["next_runs"]:
        print(f"job {n['job']}: {n['schedule']}" + (f", next {n['due']}" if n["due"] else "")
              + ("" if n["enabled"] else " (disabled)"))
    return EXIT_OK


_LIST_COLS = {
    "repo": ["name", "url", "max_tasks", "available"],
    "proxy": ["name", "max_tasks", "transports", "reach"],
    "source": ["name", "url"],
    "job": ["name", "type", "repository", "objects", "schedule", "next_run", "running"],
}


def _item_commands(kind: str) -> dict[str, Callable[[argparse.Namespace], Any]]:
    async def do_list(a: argparse.Namespace) -> int:
        items = await _call(a, f"{kind}.list")
        if a.json:
            json_out(items)
        else:
            for i in items:
                if kind == "job":
                    i.setdefault("type", "backup")
                if isinstance(i.get("objects"), list):
                    i["objects"] = ",".join(o["name"] if isinstance(o, dict) else o for o in i["objects"])
                for k in ("transports", "reach"):
                    if isinstance(i.get(k), list):
                        i[k] = ",".join(i[k]) or "*"
            _print_table(items, _LIST_COLS[kind])
        return EXIT_OK

    async def do_remove(a: argparse.Namespace) -> int:
        out = await _call(a, f"{kind}.remove", name=a.name)
        json_out(out) if a.json else print(f"removed {kind} {a.name}")
        return EXIT_OK

    async def do_show(a: argparse.Namespace) -> int:
        out = await _call(a, f"{kind}.show", name=a.name)
        json_out(out) if a.json else print(json.dumps(out, indent=2))
        return EXIT_OK

    async def do_set(a: argparse.Namespace) -> int:
        out = await _call(a, f"{kind}.set", name=a.name, changes=_pairs(a.changes))
        json_out(out) if a.json else print(f"changed {kind} {a.name}")
        return EXIT_OK

    return {"list": do_list, "remove": do_remove, "show": do_show, "set": do_set}


async def _add(a: argparse.Namespace, kind: str, params: dict[str, Any]) -> int:
    out = await _call(a, f"{kind}.add", **{k: v for k, v in params.items() if v is not None})
    json_out(out) if a.json else print(f"added {kind} {out['name']}")
    return EXIT_OK


async def cmd_repo_add(a: argparse.Namespace) -> int:
    return await _add(a, "repo", {"name": a.name, "url": _local(a.path), "max_tasks": a.max_tasks,
                                  "create": not a.no_create, "block_size": a.block_size,
                                  "compression": a.compression})


async def cmd_proxy_add(a: argparse.Namespace) -> int:
    return await _add(a, "proxy", {"name": a.name, "max_tasks": a.max_tasks, "transports": a.transport or None,
                                   "reach": [_local(r) for r in a.reach] or None})


async def cmd_source_add(a: argparse.Namespace) -> int:
    return await _add(a, "source", {"name": a.name, "url": _local(a.url), "options": _pairs(a.option) or None})


_KEEP_RULES = ("last", "days", "daily", "weekly", "monthly", "yearly")


async def cmd_job_add(a: argparse.Namespace) -> int:
    if a.type != "backup":
        return await _add(a, "job", _lifecycle_params(a))
    if not a.sources:
        raise ConfigError("a backup job needs at least one SOURCE")
    for flag in ("only_object", "rewrite_threshold", "gc_wait", "sample", "to"):
        if getattr(a, flag) is not None:
            raise ConfigError(f"--{flag.replace('_', '-')} is not for backup jobs (see --type)")

    def disk(src: str) -> dict[str, Any]:
        # a configured source's name stays a name; anything else is a path or URL
        return {"source": src if a.named_sources else _local(src)}

    if a.object:
        objects = [{"name": a.object, "disks": [disk(s) for s in a.sources]}]
    else:
        objects = [{"name": Path(s).stem if "://" not in s else s.rsplit("/", 1)[-1] or s, "disks": [disk(s)]}
                   for s in a.sources]
    params: dict[str, Any] = {"name": a.name, "repository": a.repo, "objects": objects, "schedule": a.schedule,
                              "window": a.window, "retries": a.retries, "retry_delay": a.retry_delay,
                              "max_tasks": a.max_tasks, "throttle": a.throttle, "immutable_days": a.immutable_days,
                              "description": a.description}
    if a.disabled:
        params["enabled"] = False
    if any(getattr(a, f"keep_{r}") for r in _KEEP_RULES):
        params["retention"] = {f"keep_{r}": getattr(a, f"keep_{r}") for r in _KEEP_RULES if getattr(a, f"keep_{r}")}
    params.update(_pairs(a.set))
    return await _add(a, "job", params)


def _lifecycle_params(a: argparse.Namespace) -> dict[str, Any]:
    """A prune, gc, verify or copy job's table from the flags given (the daemon refuses those that
    do not fit the type, naming them)."""
    if a.sources:
        raise ConfigError(f"a {a.type} job reads no SOURCE (it works on the repository --repo)")
    params: dict[str, Any] = {"name": a.name, "type": a.type, "repository": a.repo, "schedule": a.schedule,
                              "window": a.window, "description": a.description, "objects": a.only_object,
                              "rewrite_threshold": a.rewrite_threshold, "wait": a.gc_wait, "sample": a.sample,
                              "to": _local(a.to) if a.to else None, "latest": True if a.latest else None}
    for flag in ("retries", "retry_delay", "max_tasks", "throttle", "immutable_days", "object"):
        if getattr(a, flag) is not None:
            raise ConfigError(f"--{flag.replace('_', '-')} is for backup jobs, not {a.type} jobs")
    rules = {f"keep_{r}": getattr(a, f"keep_{r}") for r in _KEEP_RULES}
    if any(v is not None for v in rules.values()):
        params["retention"] = rules  # the rules not given are off, as with 'blockferry prune'
    if a.disabled:
        params["enabled"] = False
    params.update(_pairs(a.set))
    return params


async def cmd_job_run(a: argparse.Namespace) -> int:
    async with connect(_socket(a), client="blockferry-cli") as c:
        if not a.wait:
            out = await c.call("job.run", name=a.name)
            json_out(out) if a.json else print(f"job {a.name}: session {out['session']} started")
            return EXIT_OK
        async with c.subscribe(["session", "progress"], job=a.name) as events:
            sid = (await c.call("job.run", name=a.name))["session"]
            if not a.json:
                print(f"job {a.name}: session {sid} started", file=sys.stderr)
            state = await _follow(c, events, sid, quiet=a.json or a.quiet)
        rec = await c.call("session.show", id=sid)
    if a.json:
        json_out(rec)
    else:
        _print_session(rec)
    return EXIT_OK if state in ("success", "warning") else EXIT_FAILED


async def cmd_job_stop(a: argparse.Namespace) -> int:
    out = await _call(a, "job.stop", name=a.name, reason=a.reason)
    json_out(out) if a.json else print(f"job {a.name}: stopping session {out['session']}")
    return EXIT_OK


async def cmd_session_list(a: argparse.Namespace) -> int:
    params: dict[str, Any] = {"limit": a.limit}
    if a.job:
        params["job"] = a.job
    if a.state:
        params["state"] = a.state
    rows = await _call(a, "session.list", **params)
    if a.json:
        json_out(rows)
        return EXIT_OK
    for r in rows:
        r["written"] = human(r["written_bytes"])
        r["duration"] = f"{r['duration']:.1f}s"
        r["started"] = r["started"][:19]
    _print_table(rows, ["id", "job", "kind", "trigger", "state", "started", "duration", "objects_done", "written",
                        "summary", "note"])
    return EXIT_OK


def _print_session(rec: dict[str, Any]) -> None:
    kind = "" if rec.get("kind", "backup") == "backup" else f" {rec['kind']} to {rec.get('target')}"
    print(f"session {rec['id']}: job {rec['job']}{kind} ({rec['trigger']}) {rec['state']}, started {rec['started']}"
          + (f", ended {rec['ended']}" if rec.get("ended") else ""))
    if rec.get("note"):
        print(f"  note: {rec['note']}")
    res = rec.get("result") or {}
    for o in res.get("objects", []):
        print(f"  object {shown(o['name'])}: {o['state']}" + (f", point {o['point']}" if o.get("point") else "")
              + (f", error: {o['error']}" if o.get("error") else ""))
        for d in o.get("disks", []):
            st = d.get("stats") or {}
            print(f"    disk {shown(str(d.get('name')))}: {d.get('state')} read {human(st.get('read_bytes', 0))}, "
                  f"written {human(st.get('written_bytes', 0))}" + (f", error: {d['error']}" if d.get("error") else ""))
    st = res.get("stats")
    if st:
        b = st.get("bottleneck") or {}
        print(f"  total: {human(st.get('disk_size', 0))} disks, read {human(st.get('read_bytes', 0))}, written "
              f"{human(st.get('written_bytes', 0))} in {res.get('duration', 0):.1f} s"
              + ("; bottleneck: " + ", ".join(f"{k} {v * 100:.0f}%" for k, v in b.items()) if b else ""))
    if res.get("summary"):
        print(f"  {rec.get('kind', 'backup')}: {res['summary']}")
    if rec.get("kind") == "prune" and res.get("pruned"):
        print(f"  removed: {', '.join(res['pruned'])}")
    for url, points in (res.get("copied") or {}).items():
        print(f"  copied to {url}: {len(points)} point(s)")
    for w in res.get("warnings", []):
        print(f"  warning: {w}")


async def cmd_session_show(a: argparse.Namespace) -> int:
    rec = await _call(a, "session.show", id=a.id)
    json_out(rec) if a.json else _print_session(rec)
    return EXIT_OK


class _Screen:
    """Progress bars per disk and for the job: redrawn in place on a terminal, a plain line every
    few seconds otherwise."""

    def __init__(self, quiet: bool, every: float = 5.0) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.lines = 0
        self.every = every
        self.last = 0.0

    def show(self, p: dict[str, Any]) -> None:
        if self.quiet:
            return
        rows = [_bar(f"{t['object']}/{t['disk']}", t["done_bytes"], t["total_bytes"], f"{t['state']} {t['proxy'] or ''}")
                for t in p.get("tasks", [])]
        rows.append(_bar(f"job {p['job']}", p["done_bytes"], p["total_bytes"], f"{human(p['rate'])}/s {p['state']}"))
        if self.tty:
            out = (f"\x1b[{self.lines}F" if self.lines else "") + "".join("\x1b[2K" + r + "\n" for r in rows)
            sys.stderr.write(out)
            self.lines = len(rows)
        elif time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            sys.stderr.write(rows[-1] + "\n")
        sys.stderr.flush()


def _bar(label: str, done: int, total: int, extra: str) -> str:
    frac = done / total if total else 0.0
    fill = int(frac * 24)
    return f"{label[:32]:32} [{'#' * fill}{'.' * (24 - fill)}] {frac * 100:5.1f}% {human(done)}/{human(total)} {extra}"


async def _follow(c: Any, events: Any, sid: int, *, quiet: bool) -> str:
    """Show a session's progress until it ends; its final state."""
    screen = _Screen(quiet)
    while True:
        with anyio.move_on_after(2.0):
            async for ev in events:
                if ev.data.get("session") != sid:
                    continue
                if ev.topic == "progress":
                    screen.show(ev.data)
                elif ev.topic == "session" and ev.data.get("state") in FINAL:
                    return str(ev.data["state"])
            raise EOFError  # the subscription ended: the daemon went away
        # no event for a while (or skipped ones): ask
        rec = await c.call("session.show", id=sid)
        if rec["state"] in FINAL:
            return str(rec["state"])


async def cmd_session_watch(a: argparse.Namespace) -> int:
    async with connect(_socket(a), client="blockferry-cli") as c:
        sid = a.id
        if sid is None:
            st = await c.call("status")
            running = [r for r in st["scheduler"]["running"] if a.job is None or r["job"] == a.job]
            if not running:
                raise NotFoundError("no session is running" + (f" for job {a.job}" if a.job else ""))
            sid = running[0]["session"]
        async with c.subscribe(["session", "progress"], session=sid) as events:
            rec = await c.call("session.show", id=sid)
            state = rec["state"] if rec["state"] in FINAL else await _follow(c, events, sid, quiet=a.json)
        rec = await c.call("session.show", id=sid)
    json_out(rec) if a.json else _print_session(rec)
    return EXIT_OK if state in ("success", "warning") else EXIT_FAILED


async def cmd_config_show(a: argparse.Namespace) -> int:
    json_out(await _call(a, "config.get"))
    return EXIT_OK


async def cmd_config_apply(a: argparse.Namespace) -> int:
    out = await _call(a, "config.apply", config=load_toml(Path(a.file)), replace=a.replace)
    json_out(out) if a.json else print("configuration applied")
    return EXIT_OK


async def cmd_config_reload(a: argparse.Namespace) -> int:
    out = await _call(a, "config.reload")
    json_out(out) if a.json else print("configuration reloaded")
    return EXIT_OK


async def cmd_settings_set(a: argparse.Namespace) -> int:
    out = await _call(a, "settings.set", changes=_pairs(a.changes))
    json_out(out) if a.json else print(json.dumps(out))
    return EXIT_OK


async def cmd_clock(a: argparse.Namespace) -> int:
    params: dict[str, Any] = {}
    if a.seconds is not None:
        params["seconds"] = a.seconds
    if a.to:
        params["time"] = a.to
    out = await _call(a, "clock.advance", **params)
    json_out(out) if a.json else print(out["now"])
    return EXIT_OK


# -- wiring ------------------------------------------------------------------------------------------


def register(command: Callable[..., argparse.ArgumentParser]) -> None:
    sp = command("daemon", cmd_daemon, "run the backup server: scheduler, sessions, control socket")
    sp.add_argument("--socket", help="control socket (default $XDG_RUNTIME_DIR/blockferry/blockferry.sock, "
                                     "/run/blockferry/blockferry.sock as root)")
    sp.add_argument("--state-dir", help="configuration database, sessions, log (default "
                                        "$XDG_STATE_HOME/blockferry, /var/lib/blockferry as root)")
    sp.add_argument("--config", metavar="TOML", help="seed file merged into the configuration at start and on reload")
    sp.add_argument("--allow-user", action="append", default=[], metavar="USER",
                    help="also allow this user (root and the daemon's user always are)")
    sp.add_argument("--allow-group", action="append", default=[], metavar="GROUP", help="allow members of this group")
    sp.add_argument("--socket-group", metavar="GROUP", help="group owning the socket (mode 0660 then)")
    sp.add_argument("--max-clients", type=Number(int, 1, 100_000), default=64,
                    help="clients served at once (default 64; the owner, root or this user, has as many more)")
    sp.add_argument("--max-clients-per-user", type=Number(int, 1, 100_000), default=16,
                    help="clients of one user served at once (default 16)")
    sp.add_argument("--idle-timeout", type=Number(float, 0, 86400, above=True), default=600.0, metavar="SECONDS",
                    help="close a connection with no request in progress and no subscription after this long")
    sp.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    sp.add_argument("--timezone", help="time zone of schedules (default: the host's)")
    sp.add_argument("--progress-interval", type=Number(float, 0, 3600, above=True), default=0.5, help=argparse.SUPPRESS)
    sp.add_argument("--manual-clock", metavar="ISOTIME",
                    help="schedules read a clock that starts here and moves only by 'blockferry clock' (tests, demos)")
    sp.add_argument("-q", "--quiet", action="store_true", help="log to the state directory only, not stderr")

    def client(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument("--socket", default=os.environ.get("BLOCKFERRY_SOCKET"),
                            help="the daemon's control socket (default $BLOCKFERRY_SOCKET, else the daemon's default)")
        return parser

    client(command("status", cmd_status, "the daemon's proxies, repositories, running and next jobs"))

    def group(name: str, help: str) -> Callable[..., argparse.ArgumentParser]:
        gp = command(name, None, help)
        sub = gp.add_subparsers(dest="action", required=True, metavar="ACTION")

        def action(verb: str, fn: Callable[[argparse.Namespace], Any], help: str) -> argparse.ArgumentParser:
            ap = sub.add_parser(verb, help=help, description=help)
            ap.set_defaults(fn=fn)
            ap.add_argument("--json", action="store_true", help="machine-readable output on stdout")
            return client(ap)
        return action

    for kind, noun, nouns in (("repo", "repository", "repositories"), ("proxy", "proxy", "proxies"),
                              ("source", "source", "sources"), ("job", "job", "jobs")):
        action = group(kind, f"configure {nouns} in the daemon")
        fns = _item_commands(kind)
        if kind == "repo":
            ap = action("add", cmd_repo_add, "add a repository (created if the location holds none)")
            ap.add_argument("name")
            ap.add_argument("path", help="directory or URL")
            ap.add_argument("--max-tasks", type=TASKS)
            ap.add_argument("--no-create", action="store_true", help="refuse a location that holds no repository")
            ap.add_argument("--block-size", type=BLOCK_SIZE)
            ap.add_argument("--compression", choices=list(COMPRESSION_LEVELS))
        elif kind == "proxy":
            ap = action("add", cmd_proxy_add, "add a proxy")
            ap.add_argument("name")
            ap.add_argument("--max-tasks", type=TASKS, help="tasks it runs at once (default 4)")
            ap.add_argument("--transport", action="append", default=[], help="source schemes it reads (default file)")
            ap.add_argument("--reach", action="append", default=[], metavar="PREFIX",
                            help="paths or URL prefixes it can reach (default: all)")
        elif kind == "source":
            ap = action("add", cmd_source_add, "add a named source with connection settings")
            ap.add_argument("name")
            ap.add_argument("url")
            ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
        else:
            ap = action("add", cmd_job_add, "add a backup job, or a lifecycle job (--type)")
            ap.add_argument("name")
            ap.add_argument("sources", nargs="*", metavar="SOURCE",
                            help="backup jobs: disk image, block device, URL or configured source; each is an "
                                 "object of its own unless --object groups them")
            # argparse matches an optional list right after NAME as empty; SOURCEs given after the
            # options come back as extras, which the CLI's main appends here (see engine/cli/core.py)
            ap.set_defaults(extra_positionals="sources")
            ap.add_argument("--repo", required=True, help="repository name")
            ap.add_argument("--object", help="one object (VM) with every SOURCE as its disks")
            ap.add_argument("--named-sources", action="store_true", help="SOURCEs are names of configured sources")
            ap.add_argument("--schedule", help="'daily 22:00', 'mon-fri 22:00', 'every 4h', 'after JOB'")
            ap.add_argument("--window", help="backup window, e.g. '22:00-06:00'")
            ap.add_argument("--retries", type=RETRIES)
            ap.add_argument("--retry-delay", type=SECONDS)
            ap.add_argument("--max-tasks", type=TASKS)
            ap.add_argument("--throttle", type=Number(int, 0, 1 << 50, size=True),
                            help="bytes per second for the job, e.g. 50MiB")
            ap.add_argument("--immutable-days", type=DAYS)
            ap.add_argument("--type", choices=JOB_TYPES, default="backup",
                            help="backup (the default), or a lifecycle job on --repo: prune, gc, verify, copy")
            for rule in _KEEP_RULES:
                ap.add_argument(f"--keep-{rule}", type=KEEP, metavar="N",
                                help="retention of a backup or prune job (copy: in the target)")
            ap.add_argument("--only-object", action="append", metavar="NAME",
                            help="prune, copy: only this object's points (repeatable)")
            ap.add_argument("--rewrite-threshold", type=FRACTION, metavar="F",
                            help="gc: rewrite packs this unused (0.5)")
            ap.add_argument("--gc-wait", type=SECONDS, metavar="SECONDS",
                            help="gc: wait this long for earlier sessions (default: defer the sweep)")
            ap.add_argument("--sample", type=PERCENT, metavar="PERCENT", help="verify: check this share of the chunks")
            ap.add_argument("--to", metavar="URL", help="copy: the target repository")
            ap.add_argument("--latest", action="store_true", help="copy: only the newest point of each object")
            ap.add_argument("--description")
            ap.add_argument("--disabled", action="store_true", help="never started by the scheduler")
            ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="any other job field")
            ap = action("run", cmd_job_run, "run a job now")
            ap.add_argument("name")
            ap.add_argument("--wait", action="store_true", help="wait for the end; exit 0 only on success")
            ap.add_argument("-q", "--quiet", action="store_true", help="no progress")
            ap = action("stop", cmd_job_stop, "stop a running job (between restore points)")
            ap.add_argument("name")
            ap.add_argument("--reason", default="stopped by request")
        action("list", fns["list"], f"list {nouns}")
        action("show", fns["show"], f"show a {noun}").add_argument("name")
        action("remove", fns["remove"], f"remove a {noun}").add_argument("name")
        ap = action("set", fns["set"], f"change a {noun}'s fields")
        ap.add_argument("name")
        ap.add_argument("changes", nargs="+", metavar="KEY=VALUE", help="VALUE is JSON, or else a string")

    action = group("session", "job runs: list, show, watch")
    ap = action("list", cmd_session_list, "list sessions, newest first")
    ap.add_argument("--job")
    ap.add_argument("--state")
    ap.add_argument("--limit", type=Number(int, 1, 10_000), default=50)
    action("show", cmd_session_show, "a session's results and statistics").add_argument("id", type=SESSION_ID)
    ap = action("watch", cmd_session_watch, "live progress of a session (default: the running one)")
    ap.add_argument("id", type=SESSION_ID, nargs="?")
    ap.add_argument("--job")

    action = group("config", "the daemon's whole configuration")
    action("show", cmd_config_show, "print the configuration (JSON)")
    ap = action("apply", cmd_config_apply, "add or replace items from a TOML file, all or nothing")
    ap.add_argument("file")
    ap.add_argument("--replace", action="store_true", help="the configuration becomes exactly the file")
    action("reload", cmd_config_reload, "re-read the seed file (as SIGHUP does)")

    action = group("settings", "daemon-wide settings")
    action("set", cmd_settings_set, "e.g. throttle=100MiB").add_argument("changes", nargs="+", metavar="KEY=VALUE")

    ap = client(command("clock", cmd_clock, "move a daemon's manual clock (--manual-clock)"))
    ap.add_argument("seconds", type=Number(float, 0, 100 * 365 * 86400), nargs="?")
    ap.add_argument("--to", metavar="ISOTIME")
