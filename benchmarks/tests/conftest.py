"""The benchmark tests run in the library tests' environment (offline hub, Ray on loopback,
tests/conftest.py) and use its helpers (``tests.conftest.tiny_config``)."""

import tests.conftest  # noqa: F401
