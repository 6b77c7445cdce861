"""`python -m qat_runner`: compose the Hydra config and run one job (or a sweep with -m)."""
from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from .config import ConfigError, config_dir, register
from .preflight import command_line_error

log = logging.getLogger("qat_runner")
register()


def _sigterm_as_interrupt(signum, frame):  # so SIGTERM ends the MLflow run KILLED, like Ctrl-C
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    problem = command_line_error(sys.argv[1:])  # before Hydra: it builds its callbacks first
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    hydra_main()


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def hydra_main(cfg: DictConfig) -> float:
    from .runner import TrainingError, run  # heavy imports after Hydra has parsed the command line

    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        summary = run(cfg, output_dir, overrides=",".join(hydra_cfg.overrides.task))
    except (ConfigError, TrainingError) as err:
        print(f"error: {err}", file=sys.stderr)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            raise  # Hydra records this job FAILED; the sweep callback closes the parent run
        sys.exit(2 if isinstance(err, ConfigError) else 1)
    except KeyboardInterrupt:
        print(f"interrupted: MLflow run marked KILLED; resume with trainer.resume={output_dir}",
              file=sys.stderr)
        sys.exit(130)
    print(f"{cfg.experiment_name}: run directory {output_dir}")
    return summary["int8_acc"]


if __name__ == "__main__":
    main()
