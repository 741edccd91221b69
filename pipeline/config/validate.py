"""Turn a composed DictConfig into a checked RunConfig before any model is built."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from pipeline.config.schema import RunConfig
from pipeline.errors import ConfigError


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Resolve interpolations, build the dataclasses and run every range check at once."""
    try:
        run = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as e:
        raise ConfigError([(str(e.full_key), "is required but not set (??? in the config)")]) from None
    if not isinstance(run, RunConfig):
        raise ConfigError([("<root>", "config does not follow the run schema; list run_schema in defaults")])
    problems = run.check()
    if problems:
        raise ConfigError(problems)
    return run
