"""The device agent: a Jetson (or any edge machine) as the timing node of device-in-the-loop search.

* :mod:`edge_server.agent.node`: ``make edge-node`` / ``python -m edge_server.agent start|stop``: join a Ray cluster
  with the custom resource ``edge_target:<name>`` (no CPUs or GPUs offered for training), and leave it;
* :mod:`edge_server.agent.timing`: the Ray task that times a candidate architecture with the server's own runners.

Part of the edge package (no torch or trainer); Ray is imported only by the tasks the tuner sends.
"""
