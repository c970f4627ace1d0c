"""``python -m blockferry``: the same as the ``blockferry`` command."""

from blockferry.cli import run

run()
