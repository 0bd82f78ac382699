from kushi.cli import main

raise SystemExit(main())
