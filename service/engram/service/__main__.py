"""``python -m engram.service serve|loadgen ...``: the service's commands without the ``engram`` wrapper."""

from engram.service.cli import main

raise SystemExit(main())
