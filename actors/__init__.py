"""The roles of blockferry, one actor class per module: BackupServer (server), JobManager (job),
Proxy (proxy), SourceMover (source_mover), TargetMover (target_mover), Repository (repository)."""
