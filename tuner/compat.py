"""The version gate shared by the Ray and Optuna adapters (tuner/_ray_compat.py, tuner/_optuna_compat.py)."""

from __future__ import annotations

import os

from edgetune.errors import EdgetuneError


def require_tested(lib: str, version: str, tested: tuple[str, ...], install: str) -> str:
    """``version`` when it starts with one of ``tested`` (or ``EDGETUNE_ALLOW_UNTESTED_<LIB>`` is set), else an
    error."""
    env = f"EDGETUNE_ALLOW_UNTESTED_{lib.upper()}"
    if not version.startswith(tested) and not os.environ.get(env):
        raise EdgetuneError(
            f"edgetune's {lib.capitalize()} adapter (tuner/_{lib}_compat.py) is tested with {lib} "
            f"{', '.join(v + 'x' for v in tested)}; found {lib} {version}. Install a tested release "
            f"(pip install {install!r}) or set {env}=1 to try anyway"
        )
    return version
