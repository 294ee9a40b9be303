"""Where the training metrics go (``trainer.logger``): Lightning's loggers, one or several at once.

    csv          RUN/logs/csv/v<launch>/metrics.csv; loss_curve.png is drawn from these files
    tensorboard  RUN/logs/tensorboard/v<launch>/
    wandb        a Weights & Biases run named after the run, its files under RUN/logs/wandb
                 (WANDB_MODE=offline, or trainer.logger_kwargs.wandb.offline=true, keeps it local)
    mlflow       an MLflow run in the experiment "dinotxt": a file store at RUN/logs/mlruns unless
                 trainer.logger_kwargs.mlflow.tracking_uri (or MLFLOW_TRACKING_URI) names a server

``<launch>`` counts the launches of a run folder (v0, then v1 after the first ``--resume`` ...).
``trainer.logger_kwargs.<name>`` passes settings to that logger's Lightning class (W&B: project,
entity, tags, id + resume to continue one W&B run; MLflow: experiment_name, tracking_uri, tags).
W&B and MLflow also get the resolved config as hyperparameters (the local loggers have config.yaml).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List

from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from ..config import ConfigError
from ..utils.plugins import module_installed as _installed  # one name tests can patch

log = logging.getLogger(__name__)

# logger name -> (the module it needs, the pip package that brings it)
NEEDS = {"csv": (None, None), "tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
         "mlflow": ("mlflow", "mlflow")}
# MLflow drops longer parameter values (with a warning per value); they are in config.yaml anyway
_MLFLOW_PARAM_CHARS = 250


class _FinishingWandbLogger(WandbLogger):
    """Lightning's W&B logger, ending its W&B run with the fit: a later run in the same process (a notebook,
    a sweep, the tests) gets its own W&B run instead of continuing this one."""

    def finalize(self, status: str) -> None:
        super().finalize(status)
        if self._experiment is not None and getattr(self._experiment, "finish", None):
            self._experiment.finish(exit_code=0 if status == "success" else 1)


def logger_names(value: Any) -> List[str]:
    """``trainer.logger`` as a list of names, in order, without repeats."""
    names = [value] if isinstance(value, str) else list(value or [])
    return list(dict.fromkeys(str(n) for n in names))


def check_loggers(trainer_cfg: DictConfig) -> List[str]:
    """The chosen loggers; a one-line error for settings of a logger not chosen, or a missing package
    (the names themselves are checked when the config is loaded)."""
    names = logger_names(trainer_cfg.logger)
    for name in trainer_cfg.logger_kwargs or {}:
        if name not in names:
            raise ConfigError(f"trainer.logger_kwargs.{name} is set but trainer.logger={names} does not include "
                              f"{name}; add it (trainer.logger=[{','.join(names + [str(name)])}]) or remove the settings")
        if not isinstance(trainer_cfg.logger_kwargs[name], (dict, DictConfig)):
            raise ConfigError(f"trainer.logger_kwargs.{name} must be a mapping of settings, e.g. "
                              f"trainer.logger_kwargs.{name}.project=NAME")
    for name in names:
        module, package = NEEDS[name]
        if module and not _installed(module):
            raise ImportError(f"trainer.logger={name} needs the {package} package: pip install {package}")
    return names


def launch_number(run_dir: Path) -> int:
    """How many launches of this run folder wrote logs before (the version folder of this one)."""
    counts = [len(list((run_dir / "logs" / kind).glob("v*"))) for kind in ("csv", "tensorboard")
              if (run_dir / "logs" / kind).is_dir()]
    return max(counts, default=0)


def _flat_params(cfg: DictConfig, limit: int) -> Dict[str, Any]:
    """The config as ``section/key`` parameters, leaving out values longer than ``limit`` characters."""
    out: Dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}/")
            return
        if len(str(node)) > limit:
            return
        out[prefix.rstrip("/")] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def _local_mlflow(logs: Path) -> str:
    """MLflow's store in the run folder: SQLite (what MLflow 3 recommends; the full ``mlflow`` package
    brings SQLAlchemy), else its file store (``mlflow-skinny``; MLflow 3 wants MLFLOW_ALLOW_FILE_STORE=true)."""
    logs.mkdir(parents=True, exist_ok=True)
    if _installed("sqlalchemy"):
        return f"sqlite:///{(logs / 'mlflow.db').resolve()}"
    return (logs / "mlruns").resolve().as_uri()


def build_loggers(cfg: DictConfig, run_dir: Path) -> List[Any]:
    """Lightning loggers for ``trainer.logger`` (``trainer.logger_kwargs`` applied), writing under ``RUN/logs``."""
    names = check_loggers(cfg.trainer)
    settings = {k: dict(OmegaConf.to_container(v, resolve=True)) for k, v in (cfg.trainer.logger_kwargs or {}).items()}
    logs = run_dir / "logs"
    version = f"v{launch_number(run_dir)}"
    loggers = []
    for name in names:
        kw = settings.get(name, {})
        try:
            if name == "csv":
                from lightning.pytorch.loggers import CSVLogger

                loggers.append(CSVLogger(str(logs), **{"name": "csv", "version": version, **kw}))
            elif name == "tensorboard":
                from lightning.pytorch.loggers import TensorBoardLogger

                loggers.append(TensorBoardLogger(str(logs), **{"name": "tensorboard", "version": version, **kw}))
            elif name == "wandb":
                (logs / "wandb").mkdir(parents=True, exist_ok=True)  # wandb writes RUN/logs/wandb/<run>
                lg = _FinishingWandbLogger(**{"name": cfg.name, "project": "dinotxt", "save_dir": str(logs), **kw})
                lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))  # W&B shows nested sections
                loggers.append(lg)
            elif name == "mlflow":
                from lightning.pytorch.loggers import MLFlowLogger

                kw["tracking_uri"] = kw.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or _local_mlflow(logs)
                lg = MLFlowLogger(**{"experiment_name": "dinotxt", "run_name": cfg.name, **kw})
                try:
                    lg.log_hyperparams(_flat_params(cfg, _MLFLOW_PARAM_CHARS))  # opens the store: its errors show now
                except Exception as e:  # MlflowException: a store MLflow refuses or cannot reach
                    raise ConfigError(f"trainer.logger=mlflow cannot use the tracking store {kw['tracking_uri']} "
                                      f"({type(e).__name__}: {str(e).strip().splitlines()[0]}); set "
                                      "trainer.logger_kwargs.mlflow.tracking_uri") from None
                loggers.append(lg)
        except TypeError as e:  # a setting the logger class does not take
            raise ConfigError(f"trainer.logger_kwargs.{name}: {str(e).splitlines()[0]}") from None
    if "csv" not in names:
        log.info(f"trainer.logger={names} has no csv: this launch adds nothing to loss_curve.png")
    return loggers
