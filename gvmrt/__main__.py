from gvmrt.cli import main

raise SystemExit(main())
