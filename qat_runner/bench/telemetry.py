"""No usage telemetry from the benchmark's optional tools: OpenVINO and NNCF.

Both report usage to Google Analytics through the `openvino_telemetry` package unless the user
has opted out: `import openvino` itself starts OpenVINO's client (openvino.tools.ovc sends an
"import" event), and `import nncf` starts NNCF's. With no consent file they do not ask, they send.

`disable()`, called before the benchmark imports either, turns both off for this process:

* `NNCF_CI=1`: NNCF replaces its telemetry object by a stub;
* `openvino_telemetry` hidden from the process (`sys.modules` entry None): OpenVINO falls back to
  its own telemetry stub and NNCF builds no client ("No telemetry will be sent"); nothing is
  written under ~/intel.

For a machine or a user for good: `opt_in_out --opt_out` (installed with openvino_telemetry; writes
"0" to ~/intel/openvino_telemetry). Exporting `NNCF_CI=1` covers NNCF alone; OpenVINO also stops
with `CI=true`, which other tools read too.
"""
from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)


def disable() -> bool:
    """Turn OpenVINO's and NNCF's telemetry off in this process (idempotent). False when a real
    `openvino_telemetry` was imported before (then only NNCF's is off, and the user's opt-out
    decides about OpenVINO's)."""
    os.environ["NNCF_CI"] = "1"
    module = sys.modules.get("openvino_telemetry", None)
    if module is not None:
        log.warning("openvino_telemetry was imported before the benchmark could turn it off; "
                    "run `opt_in_out --opt_out` to opt out for good")
        return False
    sys.modules["openvino_telemetry"] = None  # `import openvino_telemetry` now raises ImportError
    return True


def child_env() -> dict[str, str]:
    """The variables a subprocess needs for the same (it calls `disable()` itself before imports)."""
    return {"NNCF_CI": "1"}
