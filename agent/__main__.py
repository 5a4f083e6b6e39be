"""`python -m agent` is the `exfilwatch` command."""

from agent.cli import main

raise SystemExit(main())
