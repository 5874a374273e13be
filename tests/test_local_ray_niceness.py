"""A local study's Ray workers train at the driver's priority (Ray's default worker niceness is 15: on a machine
doing other work a time-budgeted study would train a fraction of what its budget holds)."""

from __future__ import annotations

import os

import ray

from tuner.cluster import connect, shutdown


def test_local_instance_workers_are_not_niced() -> None:
    info = connect("local", quiet=True)
    try:
        nice = ray.get(ray.remote(lambda: os.nice(0)).remote())
    finally:
        shutdown(info)
    assert nice == os.nice(0)
