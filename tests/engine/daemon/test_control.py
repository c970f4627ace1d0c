"""The control socket against a real daemon in-process: handshake, bad frames, many clients,
peer credentials, slow subscribers, fuzzing."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import anyio
import msgspec
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from blockferry.daemon.client import connect
from blockferry.daemon.protocol import (
    HEADER,
    MAX_REQUEST,
    Error,
    Hello,
    Request,
    Welcome,
    decode_server,
    frame,
    read_frame,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.daemon_util import running_daemon


async def raw(path: Path) -> tuple[anyio.abc.SocketStream, BufferedByteReceiveStream]:
    s = await anyio.connect_unix(path)
    return s, BufferedByteReceiveStream(s)


async def receive(buf: BufferedByteReceiveStream) -> object:
    with anyio.fail_after(5):
        return decode_server(await read_frame(buf, 1 << 24))


async def closed(buf: BufferedByteReceiveStream) -> bool:
    with anyio.fail_after(5):
        try:
            await buf.receive_exactly(1)
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError, ConnectionResetError):
            return True
    return False


@pytest.mark.anyio
async def test_socket_is_private_and_handshake_comes_first(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as (daemon, client):
        assert stat.S_IMODE(os.stat(daemon.options.socket).st_mode) == 0o600
        assert client.welcome.version == 1 and client.welcome.pid == os.getpid()
        s, buf = await raw(daemon.options.socket)
        async with s:
            await s.send(frame(Request(id=1, method="status")))
            err = await receive(buf)
            assert isinstance(err, Error) and err.code == "handshake_required" and err.id == 1
            assert await closed(buf)
        s, buf = await raw(daemon.options.socket)
        async with s:
            await s.send(frame(Hello(versions=[99])))
            err = await receive(buf)
            assert isinstance(err, Error) and err.code == "unsupported_version"
            assert await closed(buf)
    assert not daemon.options.socket.exists()  # removed on the way out


@pytest.mark.anyio
async def test_bad_messages_get_errors_and_the_connection_goes_on(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as (daemon, client):
        s, buf = await raw(daemon.options.socket)
        async with s:
            await s.send(frame(Hello(versions=[1], client="t")))
            assert isinstance(await receive(buf), Welcome)
            await s.send(HEADER.pack(3) + b"\xc1\xc1\xc1")  # not msgpack
            err = await receive(buf)
            assert isinstance(err, Error) and err.code == "bad_request" and err.id is None
            await s.send(frame(Request(id=5, method="no.such")))
            err = await receive(buf)
            assert isinstance(err, Error) and err.code == "unknown_method" and err.id == 5
            await s.send(frame(Request(id=6, method="job.run", params={"nmae": "x"})))
            err = await receive(buf)
            assert isinstance(err, Error) and err.code == "invalid" and err.field == "nmae"
            await s.send(frame(Request(id=8, method="status")))
            reply = await receive(buf)
            assert getattr(reply, "id", None) == 8 and reply.result["pid"] == os.getpid()  # type: ignore[attr-defined]
            # a frame larger than the limit: error, then the connection closes
            await s.send(HEADER.pack(MAX_REQUEST + 1))
            err = await receive(buf)
            assert isinstance(err, Error) and err.code == "frame_too_large"
            assert await closed(buf)
        s, buf = await raw(daemon.options.socket)  # truncated frame, then the client leaves
        await s.send(frame(Hello(versions=[1]))[:-2])
        await s.aclose()
        assert (await client.call("status"))["pid"] == os.getpid()


@pytest.mark.anyio
async def test_fifty_clients_at_once(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as (daemon, _):
        results: list[int] = []

        async def one(i: int) -> None:
            async with connect(daemon.options.socket, client=f"c{i}") as c:
                async with anyio.create_task_group() as tg:  # overlapping requests on one connection
                    for _ in range(3):
                        tg.start_soon(c.call, "session.list")
                results.append((await c.call("status"))["pid"])

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for i in range(50):
                    tg.start_soon(one, i)
        assert results == [os.getpid()] * 50
        assert daemon.control is not None and daemon.control.accepted >= 51


@pytest.mark.anyio
async def test_a_slow_subscriber_never_blocks_publishing(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as (daemon, client):
        s, buf = await raw(daemon.options.socket)
        async with s:
            await s.send(frame(Hello(versions=[1])))
            await receive(buf)
            await s.send(frame(Request(id=1, method="subscribe", params={"topics": ["progress"]})))
            await receive(buf)
            # never read again: publishing 20000 events still returns at once
            t0 = anyio.current_time()
            for i in range(20000):
                daemon.bus.publish("progress", {"job": "x", "blob": "y" * 200, "i": i})
                if i % 1000 == 0:
                    await anyio.sleep(0)  # let the connection's tasks move what they can
            assert anyio.current_time() - t0 < 5
            assert daemon.bus.statistics()["skipped"] > 0
            assert (await client.call("status"))["pid"] == os.getpid()


@pytest.mark.anyio
async def test_subscriptions_receive_events_in_order(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as (daemon, client):
        async with client.subscribe(["session"], job="a") as events:
            daemon.bus.publish("session", {"job": "b", "state": "running"})
            daemon.bus.publish("session", {"job": "a", "state": "running"})
            daemon.bus.publish("session", {"job": "a", "state": "success"})
            with anyio.fail_after(5):
                got = [await events.__anext__(), await events.__anext__()]
        assert [e.data["state"] for e in got] == ["running", "success"] and [e.seq for e in got] == [1, 2]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
@pytest.mark.anyio
async def test_another_user_is_refused_by_peer_credentials_unless_its_group_is_allowed(tmp_path: Path) -> None:
    import tempfile

    public = Path(tempfile.mkdtemp(prefix="bf-peer-"))
    public.chmod(0o755)  # the socket's directory must be searchable by the other user
    async with running_daemon(tmp_path, socket=public / "d.sock") as (daemon, client):
        path = daemon.options.socket
        os.chmod(path, 0o666)  # let the connection through the file mode: SO_PEERCRED must refuse it
        code = (  # the system Python (the venv's may not be readable by nobody), no msgspec: raw bytes.
            # The refusal comes before the daemon reads anything: no need to send a hello.
            "import socket, struct, sys\n"
            f"s = socket.socket(socket.AF_UNIX); s.connect({str(path)!r})\n"
            "n = struct.unpack('>I', s.recv(4))[0]; data = b''\n"
            "while len(data) < n: data += s.recv(n - len(data))\n"
            "sys.stdout.buffer.write(data)\n"
        )
        proc = await anyio.run_process(["/usr/bin/python3", "-c", code], user=65534, group=65534, extra_groups=[],
                                       check=False)
        reply = msgspec.msgpack.decode(proc.stdout) if proc.stdout else {}
        out = str(reply)
        assert "permission_denied" in out and "nobody" in out and "not allowed" in out, out + proc.stderr.decode()
        assert daemon.control is not None and daemon.control.refused == 1
        assert (await client.call("status"))["pid"] == os.getpid()
    # the same user, once its group is allowed, is welcome; the socket belongs to that group
    async with running_daemon(tmp_path, socket=public / "g.sock", allowed_groups=["nogroup"],
                              socket_group="nogroup") as (daemon, client):
        st = os.stat(daemon.options.socket)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == 65534
        hello = frame(Hello(versions=[1]))
        greet = code.replace("d.sock')\n", f"g.sock'); s.sendall({hello!r})\n")
        assert "sendall" in greet
        proc = await anyio.run_process(["/usr/bin/python3", "-c", greet], user=65534,
                                       group=65534, extra_groups=[], check=False)
        reply = msgspec.msgpack.decode(proc.stdout) if proc.stdout else {}
        assert reply.get("type") == "welcome" and reply.get("user") == "nobody", proc.stderr.decode()
    shutil.rmtree(public)


frames = st.one_of(
    st.binary(max_size=64).map(lambda b: HEADER.pack(len(b)) + b),
    st.binary(max_size=16),
    st.dictionaries(st.sampled_from(["type", "id", "method", "params", "versions"]),
                    st.one_of(st.integers(-(2**63), 2**64 - 1), st.text(max_size=8),
                              st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3),
                              st.sampled_from(["hello", "request", "status", "job.add", "subscribe"])),
                    max_size=5).map(lambda d: frame(d)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(frames, min_size=1, max_size=6), st.booleans())
def test_fuzzed_frames_never_crash_the_daemon(tmp_path_factory: pytest.TempPathFactory, chunks: list[bytes],
                                              hello_first: bool) -> None:
    tmp = tmp_path_factory.mktemp("fuzz")

    async def main() -> None:
        async with running_daemon(tmp) as (daemon, client):
            s = await anyio.connect_unix(daemon.options.socket)
            async with s:
                if hello_first:
                    await s.send(frame(Hello(versions=[1])))
                for c in chunks:
                    try:
                        await s.send(c)
                    except (anyio.BrokenResourceError, OSError):
                        break
            with anyio.fail_after(5):
                assert (await client.call("status"))["pid"] == os.getpid()

    anyio.run(main)


def test_no_tcp_listener() -> None:
    import blockferry.daemon.control as control

    assert "create_tcp_listener" not in Path(control.__file__).read_text()


# -- nobody can lock the others out ------------------------------------------------------------------

HOLDER = (  # the system Python as another user, no msgspec: raw frames. Opens N connections, says
    # hello on each, prints each answer's payload (hex), and holds them until stdin closes.
    "import socket, struct, sys\n"
    "path, n, hello = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])\n"
    "held = []\n"
    "for _ in range(n):\n"
    "    s = socket.socket(socket.AF_UNIX); s.connect(path)\n"
    "    try:\n"
    "        s.sendall(hello)\n"
    "    except OSError:\n"
    "        pass\n"
    "    size = struct.unpack('>I', s.recv(4, socket.MSG_WAITALL))[0]\n"
    "    print(s.recv(size, socket.MSG_WAITALL).hex(), flush=True)\n"
    "    held.append(s)\n"
    "sys.stdin.read()\n"
)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as other users")
@pytest.mark.anyio
async def test_idle_clients_of_other_users_cannot_lock_out_each_other_or_the_owner(tmp_path: Path) -> None:
    import tempfile

    public = Path(tempfile.mkdtemp(prefix="bf-limit-"))
    public.chmod(0o755)
    hello = frame(Hello(versions=[1], client="holder")).hex()
    try:
        async with running_daemon(tmp_path, socket=public / "d.sock", allowed_users=["nobody", "65533"],
                                  max_clients=3, max_clients_per_user=2) as (daemon, client):
            os.chmod(daemon.options.socket, 0o666)
            async with anyio.create_task_group() as tg:
                answers: dict[int, list[str]] = {}
                procs = []

                async def hold(uid: int, n: int, ready: anyio.Event) -> None:
                    proc = await anyio.open_process(["/usr/bin/python3", "-c", HOLDER, str(daemon.options.socket),
                                                     str(n), hello], user=uid, group=65534, extra_groups=[])
                    procs.append(proc)
                    assert proc.stdout is not None
                    lines = BufferedByteReceiveStream(proc.stdout)
                    answers[uid] = []
                    for _ in range(n):
                        with anyio.fail_after(10):
                            answers[uid].append((await lines.receive_until(b"\n", 1 << 20)).decode())
                    ready.set()
                    await proc.wait()

                first, second = anyio.Event(), anyio.Event()
                tg.start_soon(hold, 65534, 3, first)  # wants 3, may have 2 (its own limit)
                await first.wait()
                tg.start_soon(hold, 65533, 2, second)  # gets the last of the 3, then the limit is reached
                await second.wait()
                codes = {uid: [msgspec.msgpack.decode(bytes.fromhex(a)).get("code", "welcome") for a in got]
                         for uid, got in answers.items()}
                assert codes == {65534: ["welcome", "welcome", "too_many_clients"],
                                 65533: ["welcome", "too_many_clients"]}, codes
                refusal = msgspec.msgpack.decode(bytes.fromhex(answers[65534][2]))["message"]
                assert "max_clients_per_user" in refusal and "nobody" in refusal
                # every slot of the others is taken: the owner still gets in, many times over
                async with connect(daemon.options.socket) as c1, connect(daemon.options.socket) as c2:
                    assert (await c1.call("status"))["clients"]["clients"] == 3 + 3  # 3 others, 3 owner
                    assert (await c2.call("status"))["pid"] == os.getpid()
                for proc in procs:
                    assert proc.stdin is not None
                    await proc.stdin.aclose()
    finally:
        shutil.rmtree(public)


@pytest.mark.anyio
async def test_an_idle_connection_times_out_and_a_subscribed_one_does_not(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, idle_timeout=0.3) as (daemon, _):
        sub, sub_buf = await raw(daemon.options.socket)  # the older of the two: subscribed
        await sub.send(frame(Hello(versions=[1])))
        assert isinstance(await receive(sub_buf), Welcome)
        await sub.send(frame(Request(id=1, method="subscribe", params={"topics": ["session"]})))
        assert getattr(await receive(sub_buf), "id", None) == 1
        idle, idle_buf = await raw(daemon.options.socket)
        await idle.send(frame(Hello(versions=[1])))
        assert isinstance(await receive(idle_buf), Welcome)
        err = await receive(idle_buf)  # nothing sent: the daemon closes it
        assert isinstance(err, Error) and err.code == "timeout" and "without a request" in err.message
        assert await closed(idle_buf)
        await sub.send(frame(Request(id=2, method="status")))  # still served
        reply = await receive(sub_buf)
        assert getattr(reply, "id", None) == 2
        assert reply.result["clients"]["timed_out"] >= 1  # type: ignore[attr-defined]
        await idle.aclose()
        await sub.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("after_hello", [True, False])
async def test_a_frame_that_stalls_halfway_is_cut_off(tmp_path: Path, after_hello: bool) -> None:
    async with running_daemon(tmp_path, frame_timeout=0.3) as (daemon, client):
        s, buf = await raw(daemon.options.socket)
        async with s:
            if after_hello:
                await s.send(frame(Hello(versions=[1])))
                assert isinstance(await receive(buf), Welcome)
            await s.send(frame(Request(id=1, method="status"))[:7])  # the header and a little: then nothing
            err = await receive(buf)
            assert isinstance(err, Error) and err.code == "timeout" and "did not arrive whole" in err.message
            assert await closed(buf)
        assert (await client.call("status"))["pid"] == os.getpid()


def test_the_limits_and_timeouts_must_make_sense(tmp_path: Path) -> None:
    from blockferry.daemon.control import AccessPolicy, ControlServer
    from blockferry.errors import ConfigError
    from blockferry.runtime.events import EventBus

    async def handler(*args: object) -> None:
        return None

    for bad in ({"max_clients": 0}, {"max_clients_per_user": -1}, {"idle_timeout": 0},
                {"frame_timeout": float("nan")}, {"stall_timeout": -1}):
        with pytest.raises(ConfigError):
            ControlServer(tmp_path / "s", handler=handler, bus=EventBus(), access=AccessPolicy(),
                          **bad)  # type: ignore[arg-type]
