"""Checks that must run before Hydra creates the run directory: the command line composes, and
`paths.outputs` is writable (a Hydra callback)."""
from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def outputs_problem(outputs: str) -> str | None:
    """Why `outputs` cannot hold runs, or None when a file can be created there."""
    try:
        Path(outputs).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=outputs):
            pass
    except OSError as err:
        return f"{type(err).__name__}: {err.strerror or err}"
    return None


class OutputsWritable(Callback):
    """Stop with one line, exit 2, when `paths.outputs` is not writable.

    Hydra would otherwise fail later with a traceback while creating the run directory.
    """

    def _check(self, config: DictConfig) -> None:
        outputs = config.paths.outputs
        problem = outputs_problem(outputs)
        if problem is not None:
            print(f"error: paths.outputs={outputs!r} is not writable ({problem}): "
                  "choose another folder with paths.outputs=DIR", file=sys.stderr)
            sys.exit(2)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)


# --------------------------------------------------------------------------------------------
# Hydra's own composition errors (schema types, enum names, unknown keys or config options) as
# one line and exit 2, like every other bad value. Hydra prints them as several lines and exits
# 1, and has no hook to change that, so the command line is composed once here first, with
# Hydra's compose API: each value of a sweep is checked on its own.


def _one_line_reason(err: BaseException) -> str:
    """The error's own first line, with OmegaConf's type words turned into what to type."""
    cause = err.__cause__ or err
    full_key = getattr(cause, "full_key", None)
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    value = re.search(r"^Value '(.*)' (?:of type|is not)", first)
    if full_key and value:
        wanted = next((phrase for word, phrase in _TYPE_WORDS.items() if word in first), first)
        return f"{full_key}={value.group(1)!r} is not accepted: {wanted}"
    enum = re.search(r"^Invalid value '(.*)', expected one of \[(.*)\]", first)
    if full_key and enum:
        return f"{full_key}={enum.group(1)!r} is not accepted: use one of {enum.group(2)}"
    if full_key and first.startswith("Key "):
        return (f"{full_key} is not a config key ({first}): check the spelling, or add a new key "
                f"with +{full_key}=VALUE")
    missing = re.search(r"Could not find '(.*)'\s+Available options in '(.*)':\s+(.*?)\s*Config search path",
                        str(err), re.DOTALL)
    if missing:
        option, group, options = missing.groups()
        return (f"{group}={option.rsplit('/', 1)[-1]} is not accepted: use one of "
                f"{', '.join(options.split())}")
    return first


_TYPE_WORDS = {"Integer": "use an integer", "Float": "use a number", "bool": "use true or false",
               "Boolean": "use true or false"}


def _compose(overrides: list[str], config_name: str) -> None:
    from hydra import compose, initialize_config_dir

    from .config import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name="qat_runner"):
        compose(config_name=config_name, overrides=overrides, return_hydra_config=True)


def _jobs_to_check(overrides: list[str]) -> list[list[str]]:
    """The command line's overrides, one list per sweep value to check (one list without sweeps)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, OverrideParseException

    parser, parsed = OverridesParser.create(), []
    for line in overrides:  # one at a time, so a syntax error names its override
        try:
            parsed += parser.parse_overrides([line])
        except OverrideParseException as err:
            raise HydraException(f"{line!r} is not a valid override ({str(err).splitlines()[0]}): "
                                 "see Hydra's override grammar (KEY=VALUE)") from None
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    sweeps = [o for o in parsed if o.is_sweep_override() and o.is_discrete_sweep()]
    values = {id(o): list(o.sweep_string_iterator()) for o in sweeps}
    firsts = [f"{o.get_key_element()}={values[id(o)][0]}" for o in sweeps if values[id(o)]]
    jobs = [fixed + firsts]
    for i, sweep in enumerate(sweeps):
        others = firsts[:i] + firsts[i + 1:]
        jobs += [fixed + others + [f"{sweep.get_key_element()}={v}"] for v in values[id(sweep)][1:]]
    return jobs


def composition_error(argv: list[str]) -> str | None:
    """Why Hydra would refuse this command line, in one line; None when it composes.

    Interval sweeps (an Optuna search space) are left to the sweeper; a config directory given
    with --config-dir is left to Hydra.
    """
    from hydra._internal.utils import get_args_parser  # Hydra's own command-line parser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        args, _unknown = get_args_parser().parse_known_args(argv)
    except SystemExit:  # argparse's own usage error: Hydra reports it
        return None
    if args.config_dir or args.help or args.hydra_help or args.shell_completion:
        return None
    try:
        for overrides in _jobs_to_check(args.overrides):
            _compose(overrides, args.config_name or "config")
    except (HydraException, OmegaConfBaseException) as err:
        return _one_line_reason(err)
    return None
