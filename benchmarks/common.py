"""What every benchmark result is stamped with: hardware, versions, the command, the time."""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from typing import Any


def stamp() -> dict[str, Any]:
    import numpy
    import torch
    import transformers

    import u2a_dist

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "numpy": numpy.__version__,
                "u2a_dist": u2a_dist.__version__}
    for name in ("deepspeed", "sklearn", "ray", "trl"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - optional: absent or broken means "not used here"
            pass
    return {
        "hardware": {"platform": platform.platform(), "machine": platform.machine(),
                     "processor": platform.processor(), "cpu_count": os.cpu_count(),
                     "torch_threads": torch.get_num_threads(),
                     "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "versions": versions,
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
