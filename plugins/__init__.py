"""Source plugins and repository backends, found by entry point and named by URL scheme:
``file`` source (file_source) and ``file`` backend (local)."""
