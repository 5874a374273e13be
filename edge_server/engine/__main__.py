"""``python -m edge_server.engine``: see :mod:`edge_server.engine.build`."""

from edge_server.engine.build import main

raise SystemExit(main())
