from blockferry.cli.core import run

run()
