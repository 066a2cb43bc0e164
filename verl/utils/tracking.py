"""Experiment tracking: one ``Tracking`` object fans each step's metrics out to the backends in ``trainer.logger``.

Backends (each imported only when chosen, so none of their packages is required):

* ``console``: one line per step, ``step:N - key:value - ...``.
* ``file`` (alias ``jsonl``): appends ``{"step": N, "data": {...}}`` lines to ``$VERL_FILE_LOGGER_PATH``, or to
  ``${VERL_FILE_LOGGER_ROOT:-.}/{project}/{experiment}.jsonl``. Appending keeps earlier steps after a resume.
* ``tensorboard``: scalars under ``$TENSORBOARD_DIR`` (default ``tensorboard_log/{project}/{experiment}``).
* ``wandb``: honours ``WANDB_MODE``; with no ``WANDB_MODE`` and no API key (``WANDB_API_KEY`` or a ``~/.netrc``
  login) it runs offline, so a machine without network still records the run (``wandb sync`` uploads it later).
* ``mlflow``: ``$MLFLOW_TRACKING_URI``, else a local file store under ``./mlruns``; metric names are sanitised to
  what MLflow accepts (``@`` becomes ``_at_``).
* ``swanlab``: honours ``SWANLAB_MODE``; offline when there is no ``SWANLAB_API_KEY``.
* ``clearml``, ``trackio``: thin adapters for users who have those services.

A chosen backend whose package is missing fails at construction with the ``pip install`` line to run (they are
also the ``tracking`` extra: ``pip install -e .[tracking]``); an unknown name fails listing the known ones.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import numbers
import os
import re
import warnings
from typing import Any, Iterable, Sequence

__all__ = [
    "SUPPORTED_BACKENDS",
    "TrackingBackendError",
    "normalize_backends",
    "missing_backend_package",
    "Tracking",
    "ValidationGenerationsLogger",
    "sanitize_mlflow_key",
]

# name -> (python module that must be importable, pip package to install); None: no dependency
_BACKEND_REQUIREMENTS: dict[str, tuple[str, str] | None] = {
    "console": None,
    "file": None,
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "swanlab": ("swanlab", "swanlab"),
    "clearml": ("clearml", "clearml"),
    "trackio": ("trackio", "trackio"),
}
SUPPORTED_BACKENDS: tuple[str, ...] = tuple(_BACKEND_REQUIREMENTS)
# other spellings users write: jsonl is the file logger; "tracking" is verl's old name for wandb
_ALIASES = {"jsonl": "file", "tracking": "wandb"}


class TrackingBackendError(ValueError):
    """An unknown backend name, or a chosen backend whose package is not installed."""


def normalize_backends(default_backend: str | Sequence[str] | None) -> list[str]:
    """``trainer.logger`` (a name, a list of names, or None) as a list of canonical backend names, without
    duplicates. Raises :class:`TrackingBackendError` for an unknown name."""
    if default_backend is None:
        return []
    if isinstance(default_backend, str):
        names = [default_backend]
    else:
        names = list(default_backend)
    out: list[str] = []
    for raw in names:
        if not isinstance(raw, str):
            raise TrackingBackendError(f"trainer.logger entries must be strings, got {raw!r}; known backends: "
                                       f"{list(SUPPORTED_BACKENDS)}")
        name = raw.strip().lower()
        if name == "tracking":
            warnings.warn("trainer.logger 'tracking' is a deprecated name of 'wandb'", DeprecationWarning, stacklevel=2)
        name = _ALIASES.get(name, name)
        if name not in _BACKEND_REQUIREMENTS:
            raise TrackingBackendError(f"trainer.logger: unknown backend {raw!r}; known backends: "
                                       f"{list(SUPPORTED_BACKENDS)} (e.g. trainer.logger='[console,tensorboard]')")
        if name not in out:
            out.append(name)
    return out


def missing_backend_package(name: str) -> str | None:
    """The pip package to install for backend ``name`` when it is not importable; None when it is usable (or needs
    no package)."""
    req = _BACKEND_REQUIREMENTS.get(_ALIASES.get(name, name))
    if req is None:
        return None
    module, package = req
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else package


def _missing_message(name: str, package: str) -> str:
    return (f"trainer.logger includes {name!r} but the package {package!r} is not installed: run "
            f"`pip install {package}` (or `pip install -e .[tracking]` for all trackers), or remove {name!r} from "
            f"trainer.logger")


def _import_backend(name: str, module: str | None = None) -> Any:
    req = _BACKEND_REQUIREMENTS[name]
    assert req is not None
    try:
        return importlib.import_module(module or req[0])
    except ImportError as exc:
        raise TrackingBackendError(_missing_message(name, req[1])) from exc


# ---------------------------------------------------------------------------------------------- conversion -----
def _to_python(value: Any) -> Any:
    """Tensors, numpy values and containers of them as plain Python (JSON-able) values."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "detach"):  # torch.Tensor
        value = value.detach().cpu()
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "tolist"):  # numpy array / scalar
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_python(v) for v in value]
    return str(value)


def _scalar(value: Any) -> float | None:
    """A metric value as a float, or None when it is not a single number."""
    value = _to_python(value)
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _config_to_dict(config: Any) -> dict | None:
    """A DictConfig / dataclass / dict config as a plain dict (interpolations resolved where possible)."""
    if config is None:
        return None
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(config, DictConfig):
            try:
                return OmegaConf.to_container(config, resolve=True)
            except Exception:  # a broken interpolation should not stop logging
                return OmegaConf.to_container(config, resolve=False)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if isinstance(config, dict):
        return _to_python(config)
    return {"config": str(config)}


def _flatten(d: dict, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        full = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(_flatten(value, full, sep))
        else:
            out[full] = value
    return out


def _format_value(value: Any) -> str:
    value = _to_python(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.6g}"
    return str(value)


# ------------------------------------------------------------------------------------------------ backends -----
class _ConsoleLogger:

    def log(self, data: dict[str, Any], step: int) -> None:
        parts = [f"step:{step}"] + [f"{k}:{_format_value(v)}" for k, v in data.items()]
        print(" - ".join(parts), flush=True)

    def finish(self) -> None:
        pass


def file_logger_path(project_name: str, experiment_name: str, suffix: str = "") -> str:
    """Where the ``file`` backend writes: ``$VERL_FILE_LOGGER_PATH`` (suffix inserted before the extension), else
    ``${VERL_FILE_LOGGER_ROOT:-.}/{project}/{experiment}{suffix}.jsonl``."""
    explicit = os.environ.get("VERL_FILE_LOGGER_PATH")
    if explicit:
        if not suffix:
            return os.path.expanduser(explicit)
        stem, ext = os.path.splitext(os.path.expanduser(explicit))
        return f"{stem}{suffix}{ext or '.jsonl'}"
    root = os.path.expanduser(os.environ.get("VERL_FILE_LOGGER_ROOT", "."))
    return os.path.join(root, str(project_name), f"{experiment_name}{suffix}.jsonl")


class _FileLogger:

    def __init__(self, project_name: str, experiment_name: str) -> None:
        self.path = file_logger_path(project_name, experiment_name)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._fp = open(self.path, "a", encoding="utf-8")

    def log(self, data: dict[str, Any], step: int) -> None:
        if self._fp is None:
            return
        self._fp.write(json.dumps({"step": step, "data": _to_python(data)}, allow_nan=True) + "\n")
        self._fp.flush()

    def finish(self) -> None:
        if self._fp is not None:
            self._fp.close()
            self._fp = None


def tensorboard_dir(project_name: str, experiment_name: str) -> str:
    """``$TENSORBOARD_DIR`` or ``tensorboard_log/{project}/{experiment}``."""
    return os.environ.get("TENSORBOARD_DIR") or os.path.join("tensorboard_log", str(project_name), str(experiment_name))


def _summary_writer_cls() -> Any:
    _import_backend("tensorboard")  # torch's writer needs the tensorboard package
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter


class _TensorboardLogger:

    def __init__(self, project_name: str, experiment_name: str) -> None:
        self.log_dir = tensorboard_dir(project_name, experiment_name)
        os.makedirs(self.log_dir, exist_ok=True)
        self.writer = _summary_writer_cls()(log_dir=self.log_dir)

    def log(self, data: dict[str, Any], step: int) -> None:
        for key, value in data.items():
            number = _scalar(value)
            if number is not None:
                self.writer.add_scalar(key, number, step)
        self.writer.flush()

    def finish(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = os.path.expanduser("~/.netrc")
    try:
        with open(netrc, encoding="utf-8") as f:
            return "api.wandb.ai" in f.read()
    except OSError:
        return False


class _WandbLogger:

    def __init__(self, project_name: str, experiment_name: str, config: dict | None) -> None:
        self.wandb = _import_backend("wandb")
        mode = os.environ.get("WANDB_MODE")
        if not mode and not _wandb_has_credentials():
            mode = "offline"
            print(
                "wandb: no WANDB_API_KEY and no `wandb login`; logging offline under ./wandb (upload later with "
                "`wandb sync`)",
                flush=True)
        kwargs: dict[str, Any] = {"project": project_name, "name": experiment_name, "config": config}
        if mode:
            kwargs["mode"] = mode
        self.run = self.wandb.init(**kwargs)

    def log(self, data: dict[str, Any], step: int) -> None:
        self.run.log(_to_python(data), step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


_MLFLOW_BAD_CHARS = re.compile(r"[^\w\-./ :]")


def sanitize_mlflow_key(key: str) -> str:
    """MLflow metric/param names allow letters, digits, ``_ - . / : `` and spaces: ``@`` becomes ``_at_`` (so
    ``mean@4`` stays readable) and anything else becomes ``_``."""
    return _MLFLOW_BAD_CHARS.sub("_", key.replace("@", "_at_"))


class _MlflowLogger:

    def __init__(self, project_name: str, experiment_name: str, config: dict | None) -> None:
        self.mlflow = _import_backend("mlflow")
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            from pathlib import Path

            uri = Path("mlruns").resolve().as_uri()
            # MLflow >= 3.x refuses the file store unless this is set; a local file store is what we want here
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.mlflow.set_tracking_uri(uri)
        self.mlflow.set_experiment(project_name)
        self.run = self.mlflow.start_run(run_name=experiment_name)
        if config:
            params = {sanitize_mlflow_key(k): str(v)[:250] for k, v in _flatten(config).items()}
            try:
                self.mlflow.log_params(params)
            except Exception as exc:  # params are a convenience; a rejected value must not stop training
                warnings.warn(f"mlflow: could not log the config as params: {exc}", stacklevel=2)

    def log(self, data: dict[str, Any], step: int) -> None:
        metrics = {}
        for key, value in data.items():
            number = _scalar(value)
            if number is not None:
                metrics[sanitize_mlflow_key(key)] = number
        if metrics:
            self.mlflow.log_metrics(metrics, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.mlflow.end_run()
            self.run = None


class _SwanlabLogger:

    def __init__(self, project_name: str, experiment_name: str, config: dict | None) -> None:
        self.swanlab = _import_backend("swanlab")
        api_key = os.environ.get("SWANLAB_API_KEY")
        mode = os.environ.get("SWANLAB_MODE") or ("cloud" if api_key else "offline")
        if api_key and mode == "cloud":
            self.swanlab.login(api_key)
        self.run = self.swanlab.init(project=project_name,
                                     experiment_name=experiment_name,
                                     config=config,
                                     logdir=os.environ.get("SWANLAB_LOG_DIR", "swanlog"),
                                     mode=mode)

    def log(self, data: dict[str, Any], step: int) -> None:
        scalars = {k: v for k, v in ((k, _scalar(v)) for k, v in data.items()) if v is not None}
        self.swanlab.log(scalars, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.swanlab.finish()
            self.run = None


class _ClearmlLogger:

    def __init__(self, project_name: str, experiment_name: str, config: dict | None) -> None:
        clearml = _import_backend("clearml")
        self.task = clearml.Task.init(project_name=project_name, task_name=experiment_name, reuse_last_task_id=False)
        if config:
            self.task.connect_configuration(config, name="config")
        self.logger = self.task.get_logger()

    def log(self, data: dict[str, Any], step: int) -> None:
        for key, value in data.items():
            number = _scalar(value)
            if number is None:
                continue
            title, _, series = key.rpartition("/")
            self.logger.report_scalar(title=title or key, series=series, value=number, iteration=step)

    def finish(self) -> None:
        if self.task is not None:
            self.task.close()
            self.task = None


class _TrackioLogger:

    def __init__(self, project_name: str, experiment_name: str, config: dict | None) -> None:
        self.trackio = _import_backend("trackio")
        self.trackio.init(project=project_name, name=experiment_name, config=config)
        self._open = True

    def log(self, data: dict[str, Any], step: int) -> None:
        scalars = {k: v for k, v in ((k, _scalar(v)) for k, v in data.items()) if v is not None}
        self.trackio.log(scalars, step=step)

    def finish(self) -> None:
        if self._open:
            self.trackio.finish()
            self._open = False


class Tracking:
    """Log metrics to several backends at once.

    ``Tracking(project_name, experiment_name, default_backend="console", config=None)``; ``default_backend`` is a
    name or a list of names (``trainer.logger``). ``log(data, step)`` sends a flat ``{name: value}`` dict to every
    backend; ``finish()`` closes them (also called on garbage collection).
    """

    supported_backend = list(SUPPORTED_BACKENDS)

    def __init__(self,
                 project_name: str,
                 experiment_name: str,
                 default_backend: str | Sequence[str] | None = "console",
                 config: Any = None) -> None:
        self.logger: dict[str, Any] = {}  # set first so __del__ works whatever fails below
        self.project_name = str(project_name)
        self.experiment_name = str(experiment_name)
        names = normalize_backends(default_backend)
        config_dict = _config_to_dict(config)
        try:
            for name in names:
                self.logger[name] = self._make(name, config_dict)
        except BaseException:
            self.finish()
            raise

    def _make(self, name: str, config: dict | None) -> Any:
        project, experiment = self.project_name, self.experiment_name
        if name == "console":
            return _ConsoleLogger()
        if name == "file":
            return _FileLogger(project, experiment)
        if name == "tensorboard":
            return _TensorboardLogger(project, experiment)
        if name == "wandb":
            return _WandbLogger(project, experiment, config)
        if name == "mlflow":
            return _MlflowLogger(project, experiment, config)
        if name == "swanlab":
            return _SwanlabLogger(project, experiment, config)
        if name == "clearml":
            return _ClearmlLogger(project, experiment, config)
        if name == "trackio":
            return _TrackioLogger(project, experiment, config)
        raise TrackingBackendError(f"unknown backend {name!r}; known backends: {list(SUPPORTED_BACKENDS)}")

    @property
    def backends(self) -> list[str]:
        """The active backend names, in order."""
        return list(self.logger)

    def log(self, data: dict[str, Any], step: int, backend: str | Iterable[str] | None = None) -> None:
        """Send ``data`` for ``step`` to every backend (or only those named in ``backend``)."""
        wanted = None if backend is None else set(normalize_backends(backend))
        for name, logger in self.logger.items():
            if wanted is None or name in wanted:
                logger.log(data, step=step)

    def finish(self) -> None:
        """Flush and close every backend; safe to call more than once."""
        for name, logger in list(self.logger.items()):
            try:
                logger.finish()
            except Exception as exc:  # closing one backend must not prevent closing the others
                warnings.warn(f"tracking: closing {name!r} failed: {exc}", stacklevel=2)
        self.logger = {}

    def __del__(self) -> None:
        try:
            self.finish()
        except Exception:
            pass


# ---------------------------------------------------------------------------------- validation generations -----
@dataclasses.dataclass
class ValidationGenerationsLogger:
    """Log a few validation generations (input, output, score) per validation pass as a table, so that a user
    can see *what* the model answers, not only the accuracy (``trainer.log_val_generations=N``).

    ``log(loggers, samples, step)``: ``loggers`` is ``trainer.logger``; ``samples`` a list of ``(input, output,
    score)`` or ``(input, output, ground_truth, score)`` tuples. Console prints them; file appends one jsonl line to
    ``{experiment}_val_generations.jsonl`` next to the metrics file; tensorboard writes a markdown text; wandb keeps
    one table with a row per step; mlflow stores a json artifact; swanlab logs text. Other backends are skipped.
    """

    project_name: str | None = None
    experiment_name: str | None = None

    def __post_init__(self) -> None:
        self._wandb_table = None
        self._tb_writer = None

    def log(self, loggers: str | Sequence[str] | None, samples: Sequence[Sequence[Any]], step: int) -> None:
        """Write ``samples`` (validation generations of ``step``) to the chosen backends that support tables."""
        rows = [self._row(sample) for sample in samples]
        for name in normalize_backends(loggers):
            if name == "console":
                self._log_console(rows, step)
            elif name == "file":
                self._log_file(rows, step)
            elif name == "tensorboard":
                self._log_tensorboard(rows, step)
            elif name == "wandb":
                self._log_wandb(rows, step)
            elif name == "mlflow":
                self._log_mlflow(rows, step)
            elif name == "swanlab":
                self._log_swanlab(rows, step)

    @staticmethod
    def _row(sample: Sequence[Any]) -> dict[str, Any]:
        if len(sample) == 3:
            inp, out, score = sample
            return {"input": str(inp), "output": str(out), "score": _to_python(score)}
        if len(sample) == 4:
            inp, out, gts, score = sample
            return {"input": str(inp), "output": str(out), "ground_truth": _to_python(gts), "score": _to_python(score)}
        raise ValueError(f"a validation sample must be (input, output, score) or (input, output, ground_truth, "
                         f"score); got {len(sample)} fields")

    def _names(self) -> tuple[str, str]:
        return str(self.project_name or "verl"), str(self.experiment_name or "run")

    def _log_console(self, rows: list[dict], step: int) -> None:
        lines = [f"=== validation generations (step {step}, {len(rows)} samples) ==="]
        for i, row in enumerate(rows):
            extra = f", ground truth {row['ground_truth']!r}" if "ground_truth" in row else ""
            lines.append(f"--- sample {i + 1}: score {_format_value(row['score'])}{extra}")
            lines.append(f"[input]  {row['input']}")
            lines.append(f"[output] {row['output']}")
        print("\n".join(lines), flush=True)

    def _log_file(self, rows: list[dict], step: int) -> None:
        path = file_logger_path(*self._names(), suffix="_val_generations")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "samples": rows}) + "\n")

    @staticmethod
    def _markdown(rows: list[dict]) -> str:

        def cell(value: Any) -> str:
            return str(value).replace("|", "\\|").replace("\n", "<br>")

        has_gt = any("ground_truth" in r for r in rows)
        header = ["input", "output"] + (["ground_truth"] if has_gt else []) + ["score"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in rows:
            lines.append("| " + " | ".join(cell(r.get(h, "")) for h in header) + " |")
        return "\n".join(lines)

    def _log_tensorboard(self, rows: list[dict], step: int) -> None:
        if self._tb_writer is None:
            log_dir = tensorboard_dir(*self._names())
            os.makedirs(log_dir, exist_ok=True)
            self._tb_writer = _summary_writer_cls()(log_dir=log_dir)
        self._tb_writer.add_text("val/generations", self._markdown(rows), step)
        self._tb_writer.flush()

    def _log_wandb(self, rows: list[dict], step: int) -> None:
        wandb = _import_backend("wandb")
        if wandb.run is None:
            return
        columns = ["step"]
        for i in range(len(rows)):
            columns += [f"input_{i + 1}", f"output_{i + 1}", f"score_{i + 1}"]
        row = [step]
        for r in rows:
            row += [r["input"], r["output"], r["score"]]
        # wandb tables are immutable once logged: rebuild with the old rows plus this step's
        old = self._wandb_table
        table = wandb.Table(columns=columns)
        if old is not None and list(old.columns) == columns:
            for data in old.data:
                table.add_data(*data)
        table.add_data(*row)
        self._wandb_table = table
        wandb.log({"val/generations": table}, step=step)

    def _log_mlflow(self, rows: list[dict], step: int) -> None:
        mlflow = _import_backend("mlflow")
        if mlflow.active_run() is None:
            return
        mlflow.log_text(json.dumps(rows, indent=2), artifact_file=f"val_generations/step_{step}.json")

    def _log_swanlab(self, rows: list[dict], step: int) -> None:
        swanlab = _import_backend("swanlab")
        texts = [
            swanlab.Text(f"input: {r['input']}\n\noutput: {r['output']}\n\nscore: {r['score']}", caption=f"sample {i}")
            for i, r in enumerate(rows)
        ]
        swanlab.log({"val/generations": texts}, step=step)

    def finish(self) -> None:
        """Close the tensorboard writer this logger opened, if any."""
        if self._tb_writer is not None:
            self._tb_writer.close()
            self._tb_writer = None
