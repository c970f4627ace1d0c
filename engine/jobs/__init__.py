"""What the backup server knows about jobs and how their runs are coordinated: the configuration
of servers, jobs and objects (``config``) and of the daemon as a whole (``catalog``), calendars
and backup windows, tasks, the messages the roles exchange and the session results they make,
the resource slots that bound concurrent tasks, the state database of sessions, and what one
run of a lifecycle job (prune, gc, verify, copy) does.

May import: ``blockferry.runtime``, ``blockferry.repo``, ``blockferry.datapath`` and the shared
top-level helpers. Never the actors, the daemon or the CLI.
"""
