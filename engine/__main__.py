from blockferry.cli import main

raise SystemExit(main())
