from mqinfer.cli import main

raise SystemExit(main())
