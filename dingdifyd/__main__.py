from dingdifyd.cli import main

raise SystemExit(main())
