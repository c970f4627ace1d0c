"""The daemon: the assembly of a BackupServer and a Scheduler with the state database, the
control socket and its protocol, signals; and the client that speaks that protocol.

May import every layer below it (runtime, repo, datapath, restore, jobs, the actors, the API).
Never the CLI.
"""
