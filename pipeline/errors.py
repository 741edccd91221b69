"""Errors a user can act on. Each message names the file/line/key at fault and the fix.

The command-line entry prints these without a traceback (exit code 2); anything else is a bug and
keeps its traceback.
"""


class PipelineError(Exception):
    """Base for user-facing errors."""


class ConfigError(PipelineError):
    """A config value is out of range or inconsistent."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        lines = [f"  {key}: {msg}" for key, msg in problems]
        super().__init__("Invalid configuration:\n" + "\n".join(lines))


class ManifestError(PipelineError):
    """One or more manifest rows are malformed; `problems` holds `file:line: field: problem` lines."""

    def __init__(self, path, problems: list[str], hint: str = ""):
        self.path = path
        self.problems = problems
        head = f"Manifest {path} has {len(problems)} problem(s):"
        tail = f"\n{hint}" if hint else ""
        super().__init__(head + "\n" + "\n".join(f"  {p}" for p in problems) + tail)


class ModelNotFoundError(PipelineError):
    """Weights for a real model are not on this machine (we never download)."""


class DeviceError(PipelineError):
    """The requested device or precision is not available here."""


class QuantizationError(PipelineError):
    """Quantization settings or a weight file that cannot be used."""


class RunInterrupted(Exception):
    """SIGINT/SIGTERM stopped a run after it saved what it had; the command exits 128 + signal number.

    Not a PipelineError: nothing is wrong with the input, and the exit status tells a scheduler which
    signal it was (130 for Ctrl-C, 143 for SIGTERM from `timeout`, SLURM or `docker stop`).
    """

    def __init__(self, signum: int, out_dir=None):
        import signal as _signal

        self.signum = signum
        self.exit_code = 128 + signum
        self.out_dir = out_dir
        name = _signal.Signals(signum).name
        where = f"; rerun the same command to finish (output: {out_dir})" if out_dir else ""
        super().__init__(f"interrupted by {name}{where}")


class LoraError(PipelineError):
    """A LoRA file that is missing, unreadable, made for another model, or has keys no layer matches."""
