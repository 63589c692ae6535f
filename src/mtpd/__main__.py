from mtpd.cli import main

raise SystemExit(main())
