"""``python -m edge_server.agent``: see :mod:`edge_server.agent.node`."""

from edge_server.agent.node import main

raise SystemExit(main())
