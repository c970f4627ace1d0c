"""The lifecycle commands' text (engine/cli/lifecycle.py): the reports carry numbers, the CLI
words them."""

from __future__ import annotations

from blockferry.cli.lifecycle import copy_summary, gc_summary
from blockferry.repo.gc import GcReport
from blockferry.repo.lifecycle import CopyReport

from tests.conftest import MiB


def test_gc_summary() -> None:
    report = GcReport(state="done", bytes_freed=3 * MiB, packs_deleted=2, packs_rewritten=1, packs_written=1,
                      chunks_removed=40, orphan_packs_deleted=0)
    assert gc_summary(report) == ("done: 3.0 MiB freed; 2 pack(s) deleted, 1 rewritten into 1, 40 chunk(s) removed, "
                                  "0 orphan pack(s)")
    report.packs_kept_immutable = 4
    assert gc_summary(report).endswith("0 orphan pack(s); 4 pack(s) kept for immutable points")


def test_copy_summary() -> None:
    report = CopyReport(points=["a", "b"], skipped=["c"], chunks_copied=12, chunks_present=3, bytes_written=5 * MiB)
    assert copy_summary(report) == "copied 2 point(s) (1 already there): 12 chunk(s) sent (5.0 MiB), 3 already present"
