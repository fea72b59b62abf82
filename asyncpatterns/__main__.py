from asyncpatterns.cli import main

raise SystemExit(main())
