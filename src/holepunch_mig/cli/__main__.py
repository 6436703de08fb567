"""`python -m holepunch_mig.cli`."""

from holepunch_mig.cli.main import main

raise SystemExit(main())
