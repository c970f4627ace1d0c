"""The actor runtime: actors with bounded mailboxes and supervision, the worker-thread limiters
and the in-flight batch budget, reusable buffers, the event bus, bandwidth throttles and the
engine's tuning settings.

May import: ``blockferry.errors``, ``blockferry.log``, ``blockferry.units``. Nothing else of
blockferry: every other layer builds on this one.
"""
