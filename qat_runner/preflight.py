"""Checks that must run before Hydra creates the run directory: the command line composes, and
`paths.outputs` is writable (a Hydra callback)."""
from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


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
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines[:2]) if first.endswith(":") else first


_TYPE_WORDS = {"Integer": "use an integer", "Float": "use a number", "bool": "use true or false",
               "Boolean": "use true or false"}


def _compose(overrides: list[str], config_name: str) -> DictConfig:
    from hydra import compose, initialize_config_dir

    from .config import config_dir, register

    register()  # the structured schema the config tree's defaults lists name
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name="qat_runner"):
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=True)


# Hydra builds these itself, and only from its registered plugin classes.
_PLUGIN_NODES = ("launcher", "sweeper")
# logging.config.dictConfig calls a handler's `class` and any `()` factory: another way to name a callable.
_LOGGING_NODES = ("job_logging", "hydra_logging")


def _logging_problem(node: Any, key: str) -> str | None:
    if isinstance(node, dict):
        for name, value in node.items():
            if name == "()" or (name == "class" and not str(value).startswith("logging.")):
                return (f"{key}.{name}={value!r} is not accepted: logging handlers must be classes of "
                        "the logging package")
            problem = _logging_problem(value, f"{key}.{name}")
            if problem:
                return problem
    return None


def job_error(cfg: DictConfig) -> str | None:
    """A `_target_` anywhere in the composed config (callbacks included) that is not allowed, or a
    value the job's own checks (config.validate) refuse: in a sweep, before any job starts."""
    from .config import ConfigError, allowed_packages, check_targets, validate

    try:
        packages = allowed_packages(cfg)
        for key in cfg.keys():
            if key != "hydra":
                check_targets(str(key), cfg._get_node(key), packages)
        hydra_node = OmegaConf.to_container(cfg.hydra, resolve=False)  # some resolve only in a job
        for key, node in hydra_node.items():
            if key in _LOGGING_NODES:
                problem = _logging_problem(node, f"hydra.{key}")
                if problem:
                    return problem
            elif key not in _PLUGIN_NODES:
                check_targets(f"hydra.{key}", node, packages)
        validate(cfg)
    except ConfigError as err:
        return str(err)
    return None


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


def command_line_error(argv: list[str]) -> str | None:
    """Why this command line must not run, in one line: Hydra would refuse it, it names a
    `_target_` that is not allowed (checked before Hydra instantiates its callbacks), or a job's
    value is out of range. None when every job composes and passes.

    Interval sweeps (an Optuna search space) are left to the sweeper; with --config-dir the
    extra directory joins the search path.
    """
    from hydra._internal.utils import get_args_parser  # Hydra's own command-line parser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        args, _unknown = get_args_parser().parse_known_args(argv)
    except SystemExit:  # argparse's own usage error: Hydra reports it
        return None
    if args.help or args.hydra_help or args.shell_completion:
        return None
    extra = [f"hydra.searchpath=[file://{Path(args.config_dir).resolve()}]"] if args.config_dir else []
    try:
        for overrides in _jobs_to_check(args.overrides):
            problem = job_error(_compose(extra + overrides, args.config_name or "config"))
            if problem is not None:
                return problem
    except (HydraException, OmegaConfBaseException) as err:
        return _one_line_reason(err)
    return None
