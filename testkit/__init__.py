"""Fixtures shared by the tests (tests/) and the benchmarks and soak (bench/): a real test bundle and servers on
127.0.0.1 (``edge_fixtures``), recorded media (``client_media``), hostile images (``hostile_media``) and a raw
HTTP/2 client (``raw_h2``). Neither tests/ nor bench/ is imported by the other; both import this package (run from
the repository root: pytest puts it on the path, bench/common.py adds it for `python bench/x.py`)."""
