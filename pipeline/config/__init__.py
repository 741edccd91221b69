"""Config schema and its validation; `conf/` holds the YAML that fills it."""

from pipeline.config.schema import RunConfig, register_configs
from pipeline.config.validate import to_run_config

__all__ = ["RunConfig", "register_configs", "to_run_config"]
