"""``python -m engram.server serve|loadgen ...``: the service's commands without the ``engram`` wrapper."""

from engram.server.cli import main

raise SystemExit(main())
