from blockferry.cli import run

run()
