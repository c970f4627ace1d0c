"""The engine's tuning knobs (:class:`EngineSettings`): lanes, batch sizes, in-flight budgets,
thread limits, mailbox sizes. Part of a server's configuration; read by the runtime and the data
path."""

from __future__ import annotations

import msgspec
from blockferry.units import MiB, NonNegative, Positive, Seconds


class EngineSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Knobs of the data path. The defaults were measured (docs/performance.md)."""

    #: parallel read/process lanes per task
    lanes: Positive = 2
    #: bytes of blocks per batch (at least one block)
    batch_bytes: Positive = 8 * MiB
    #: batches buffered between a source mover and its target mover
    stream_batches: Positive = 2
    #: batches read but not yet written, across all tasks of the server: the memory bound of
    #: the data path (about this many times batch_bytes), whatever the number of tasks
    inflight_batches: Positive = 8
    #: restore: bytes of blocks decoded per batch (across the disks restored together), and
    #: batches in progress; larger writes keep the disk busier
    restore_batch_bytes: Positive = 16 * MiB
    restore_lanes: Positive = 6
    #: restore from a remote repository (S3): the chunks the point needs from each pack are read
    #: as spans planned over the whole point, one request each: at most restore_span_bytes of
    #: them held at once, unneeded gaps up to restore_span_gap bytes read rather than split,
    #: restore_span_streams read ahead at once; batches there are restore_remote_batch_bytes
    #: (the spans, not the batches, decide the requests, and smaller batches hold less)
    restore_span_bytes: Positive = 128 * MiB
    restore_span_gap: NonNegative = 8 * MiB
    restore_span_streams: Positive = 3
    #: spans that would not fit restore_span_bytes alongside the others needed at the same time
    #: (those needed again furthest ahead) wait in a temporary spool file beside the restored
    #: images rather than in memory, up to restore_spool_bytes (0: never)
    restore_spool_bytes: NonNegative = 4096 * MiB
    restore_remote_batch_bytes: Positive = 4 * MiB
    #: a backup with changed-extent hints into a remote repository compresses the hinted blocks
    #: while the repository opens, holding at most this many bytes of them (0: never; see
    #: engine/datapath/prepare.py)
    prepare_bytes: NonNegative = 64 * MiB
    #: worker threads hashing and compressing (0: one per core)
    cpu_threads: NonNegative = 0
    #: worker threads doing repository I/O
    io_threads: Positive = 4
    #: mailbox bound of every actor
    mailbox_size: Positive = 64
    #: seconds an actor waits for a reply before giving up
    ask_timeout: Seconds = 60.0
