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


def unknown_override_keys(overrides: list[str]) -> list[tuple[str, str]]:
    """Command-line keys that the schema lacks, each with a suggestion: [(key, message)].

    Hydra rejects these too, but suggests `+key=value`, which a typed config refuses anyway; we
    say what was probably meant instead.
    """
    import dataclasses
    import difflib
    import typing

    from pipeline.config.schema import RunConfig

    problems = []
    groups = {f.name for f in dataclasses.fields(RunConfig)}
    for ov in overrides:
        if ov.startswith(("-", "+", "~", "hydra.", "hydra/")) or "=" not in ov:
            continue
        key = ov.split("=", 1)[0]
        if "@" in key or "/" in key:
            continue
        parts = key.split(".")
        if len(parts) == 1 and key in groups:
            continue  # a group selection such as model=tiny-flux
        node: typing.Any = RunConfig
        for i, part in enumerate(parts):
            fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
            if part not in fields:
                close = difflib.get_close_matches(part, list(fields), n=1, cutoff=0.6)
                prefix = ".".join(parts[:i])
                hint = f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""
                allowed = ", ".join(fields) if fields else "(no sub-keys)"
                problems.append((key, f"unknown key{hint} (keys under {prefix or 'the root'}: {allowed})"))
                break
            hints = typing.get_type_hints(node)
            node = hints[part]
    return problems
