"""The modules that build datasets, models and checkpoints, and the benchmark, import no Hydra:
they are usable as a library (and the benchmark runs) without Hydra's import cost or its globals."""
from __future__ import annotations

import json
import subprocess
import sys

HYDRA_FREE = ["qat_runner.errors", "qat_runner.paths", "qat_runner.data", "qat_runner.models",
              "qat_runner.checkpoint", "qat_runner.engine", "qat_runner.bench", "qat_runner.bench.__main__",
              *(f"qat_runner.bench.{name}" for name in (
                  "accuracy", "contenders", "environment", "fashion", "float_checkpoint", "inference",
                  "ort_quant", "profile", "report", "run", "runtimes", "settings", "sizes", "targets",
                  "timing", "training_cost", "workspace"))]

# In a fresh interpreter (this one has Hydra loaded): import each module in turn and record what
# Hydra/OmegaConf modules are loaded after it.
PROBE = """
import importlib, json, sys
loaded = {}
for name in sys.argv[1:]:
    importlib.import_module(name)
    loaded[name] = sorted(m for m in sys.modules if m.split(".")[0] in ("hydra", "omegaconf"))
print(json.dumps(loaded))
"""


def test_library_modules_import_no_hydra():
    out = subprocess.run([sys.executable, "-c", PROBE, *HYDRA_FREE], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    offenders = {name: mods[:3] for name, mods in loaded.items() if mods}
    assert not offenders, f"the first of these imports Hydra/OmegaConf: {offenders}"
