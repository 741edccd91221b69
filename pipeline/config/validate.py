"""Turn a composed DictConfig into a checked RunConfig before any model is built."""

from __future__ import annotations

from pathlib import Path

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


# Keys people reach for that live elsewhere in the schema (difflib cannot guess these).
KEY_HINTS = {
    "job.prompt_column": "job.columns.prompt",
    "job.prompt_field": "job.columns.prompt",
    "job.prompt_key": "job.columns.prompt",
    "job.id_column": "job.columns.id",
    "job.id_field": "job.columns.id",
    "job.negative_prompt_column": "job.columns.negative_prompt",
    "job.negative_column": "job.columns.negative_prompt",
    "job.output": "job.output_dir",
    "job.outdir": "job.output_dir",
    "sampler.num_inference_steps": "sampler.steps",
    "sampler.guidance_scale": "sampler.guidance",
    "sampler.cfg": "sampler.true_cfg_scale",
    "sampler.cfg_scale": "sampler.true_cfg_scale",
}


CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # config groups that are not schema fields (experiment/)


def unknown_override_keys(overrides: list[str]) -> list[tuple[str, str]]:
    """Command-line keys that the schema lacks, each with a suggestion: [(key, message)].

    Hydra rejects these too, but suggests `+key=value`, which a typed config refuses anyway; we
    say what was probably meant instead. `+key`/`++key` get the same check (the typed config would
    drop an unknown added key without a word); `~key` deletions and Hydra's own keys are left alone.
    """
    import dataclasses
    import difflib
    import typing

    from pipeline.config.schema import RunConfig

    problems = []
    groups = {f.name for f in dataclasses.fields(RunConfig)}
    for ov in overrides:
        ov = ov.lstrip("+") if ov.startswith("+") else ov
        if ov.startswith(("-", "~", "hydra.", "hydra/")) or "=" not in ov:
            continue
        key = ov.split("=", 1)[0]
        if "@" in key or "/" in key or key == "hydra":
            continue
        parts = key.split(".")
        if len(parts) == 1 and (key in groups or (CONF_DIR / key).is_dir()):
            continue  # a group selection such as model=tiny-flux or +experiment=quality (its option: checked later)
        node: typing.Any = RunConfig
        for i, part in enumerate(parts):
            fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
            if part not in fields:
                prefix = ".".join(parts[:i])
                close = difflib.get_close_matches(part, list(fields), n=1, cutoff=0.6)
                if key in KEY_HINTS:
                    hint = f"; did you mean {KEY_HINTS[key]}?"
                elif close:
                    hint = f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?"
                else:
                    hint = ""
                allowed = ", ".join(fields) if fields else "(no sub-keys)"
                problems.append((key, f"unknown key{hint} (keys under {prefix or 'the root'}: {allowed})"))
                break
            hints = typing.get_type_hints(node)
            node = hints[part]
    return problems


def schema_type(key: str):
    """The declared type of a dotted key in the run schema (e.g. Optional[int]), or None if it has none."""
    import dataclasses
    import typing

    from pipeline.config.schema import RunConfig

    node: typing.Any = RunConfig
    for part in key.split("."):
        if not dataclasses.is_dataclass(node):
            return None
        hints = typing.get_type_hints(node)
        if part not in hints:
            return None
        node = hints[part]
    return node


def describe_bad_value(key: str, text: str, error: Exception | None = None) -> str:
    """Why `key=text` does not fit the schema, in words: "'four' is not an integer"."""
    import typing
    from enum import Enum

    t = schema_type(key)
    if typing.get_origin(t) is typing.Union:
        args = [a for a in typing.get_args(t) if a is not type(None)]
        t = args[0] if len(args) == 1 else None
    if isinstance(t, type) and issubclass(t, Enum):
        return f"'{text}' is not one of {', '.join(m.name for m in t)}"
    what = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(t)
    if what:
        return f"'{text}' is not {what}"
    if typing.get_origin(t) is list:
        return f"'{text}' is not a list (write {key}=[a,b])"
    return _first_line(error) if error is not None else f"'{text}' does not fit this key"


def group_options(config_dir: Path, group: str) -> list[str] | None:
    """The options of a config group (`conf/<group>/*.yaml`), or None if `group` is not one."""
    folder = config_dir / group
    if not group or group.startswith("hydra") or not folder.is_dir():
        return None
    return sorted(p.stem for p in folder.iterdir() if p.suffix in (".yaml", ".yml"))


def _first_line(error: BaseException | None) -> str:
    return str(error).strip().splitlines()[0] if error is not None and str(error).strip() else type(error).__name__


def _is_hydra(override) -> bool:
    key = override.key_or_group
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


def check_command_line(args: list[str], config_dir: Path, config_name: str) -> list[str]:
    """Problems with a command line, one `where: what` message each (empty: fine), before Hydra starts.

    Hydra would reject most of these itself, but with exit status 1 and a message in its own words;
    here every bad key, value or group option becomes one clear line and the caller exits 2. In a
    sweep (-m) every value of every swept key is checked, so a bad value refuses the whole sweep
    before any job starts. Hydra's own settings (`hydra.*`, `hydra/...`) are left to Hydra.
    """
    import contextlib
    import io

    from hydra._internal.utils import get_args_parser

    if any(a in ("--version", "-h", "--help", "--hydra-help") for a in args):
        return []
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            ns = get_args_parser().parse_args(args)
    except SystemExit:
        return []  # Hydra prints its usage message and exits 2 itself
    if ns.shell_completion or ns.info or ns.experimental_rerun:
        return []
    return _check_overrides(ns.overrides, bool(ns.multirun), config_dir, ns.config_name or config_name,
                            compose=not (ns.config_path or ns.config_dir))


def _check_overrides(lines: list[str], multirun: bool, config_dir: Path, config_name: str,
                     compose: bool = True) -> list[str]:
    import difflib

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob, ValueType
    from hydra.errors import HydraException, OverrideParseException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    parser = OverridesParser.create()
    parsed, problems = [], []
    for line in lines:
        try:
            parsed.extend(parser.parse_overrides([line]))
        except OverrideParseException as e:
            problems.append(f"{line}: cannot parse this override ({_first_line(e)}); quote a value that holds "
                            f"'=', spaces or brackets: key='a=b' "
                            f"(https://hydra.cc/docs/advanced/override_grammar/basic)")
    if problems:
        return problems
    problems = [f"{key}: {msg}" for key, msg in unknown_override_keys(lines)]
    if problems:
        return problems
    ours = [o for o in parsed if not _is_hydra(o)]

    def sweep_texts(o, options=None) -> list[str]:
        if o.value_type == ValueType.GLOB_CHOICE_SWEEP:
            glob = o.value()
            return glob.filter(options) if options is not None and isinstance(glob, Glob) else []
        if o.value_type == ValueType.INTERVAL_SWEEP:
            return []
        return list(o.sweep_string_iterator())

    # Group options (model=tiny-flx), every value of a sweep.
    for o in ours:
        options = None if o.is_delete() else group_options(config_dir, o.key_or_group)
        if options is None:
            continue
        if o.is_sweep_override():
            values = sweep_texts(o, options) if multirun else []
        else:
            values = [o.value()]
        for v in values:
            if isinstance(v, str) and v not in options:
                close = difflib.get_close_matches(v, options, n=1, cutoff=0.5)
                hint = f" (did you mean {close[0]}?)" if close else ""
                problems.append(f"{o.key_or_group}={v}: no such option; available: {', '.join(options)}{hint}")
    if problems or not compose:
        return problems

    # Compose as Hydra will (each sweep at its first value): wrong types, bad enum values, the rest.
    first: list[str] = []
    typed: dict[str, str] = {}  # key -> value as typed, to name it in a message
    for o in ours:
        if multirun and o.is_sweep_override():
            options = group_options(config_dir, o.key_or_group)
            texts = sweep_texts(o, options)
            if not texts:
                continue
            first.append(f"{o.get_key_element()}={texts[0]}")
            typed[o.key_or_group] = texts[0]
        else:
            first.append(o.input_line)
            if not o.is_delete() and not o.is_sweep_override():
                typed[o.key_or_group] = o.get_value_element_as_str()
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=first)
    except (HydraException, OmegaConfBaseException, ValueError) as e:  # ValueError: e.g. model=null
        return [_explain_compose_error(e, typed)]

    if multirun:
        # The other values of each swept key: set them one by one on the composed config.
        for o in ours:
            if not o.is_sweep_override() or group_options(config_dir, o.key_or_group) is not None:
                continue
            key = o.key_or_group
            for text in sweep_texts(o)[1:]:
                try:
                    value = parser.parse_override(f"{key}={text}").value()
                except HydraException:
                    continue  # the sweeper makes the same line; Hydra will say what is wrong with it
                try:
                    OmegaConf.update(cfg, key, value, merge=True)
                except OmegaConfBaseException as e:
                    problems.append(f"{key}: {describe_bad_value(key, text, e)}")
        try:
            output_dir = OmegaConf.select(cfg, "job.output_dir")
        except OmegaConfBaseException:
            output_dir = None
        if output_dir:
            problems.append("job.output_dir: not used in a sweep (-m): each job writes into its own folder under "
                            "hydra.sweep.dir; set hydra.sweep.dir=DIR instead (or job.output_dir=null)")
    return problems


def _explain_compose_error(e: Exception, typed: dict[str, str]) -> str:
    from hydra.errors import MissingConfigException

    cause = e.__cause__ if e.__cause__ is not None else e
    key = getattr(cause, "full_key", None)
    if key:
        if key in typed:
            return f"{key}: {describe_bad_value(key, typed[key], cause)}"
        return f"{key}: {_first_line(cause)}"
    if isinstance(e, MissingConfigException):
        options = f"; available: {', '.join(e.options)}" if e.options else ""
        return f"{_first_line(e)}{options}"
    text = str(e).split("\nConfig search path")[0].strip()
    lines = [ln for ln in text.splitlines() if ln.strip()] or [type(e).__name__]
    if e.__cause__ is not None:
        lines.append(_first_line(e.__cause__))
    return "\n  ".join(lines)
