from loratune.cli import main

raise SystemExit(main())
