"""Logging: what dinotxt and curation report while they work goes through the ``dinotxt`` and
``curation`` loggers (``logging.getLogger(__name__)`` in every module), so a library user can
silence or redirect it like any other library's. The command line shows INFO on stdout
(``--quiet``: warnings only), as ``[dinotxt] message`` / ``[curate] message``. Results tables
that a command exists to print are printed, not logged."""
from __future__ import annotations

import logging
import sys

LOGGERS = ("dinotxt", "curation")


class _Stdout(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a message is emitted (a redirected stdout, pytest's capture)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the property decides
        pass

    def emit(self, record: logging.LogRecord) -> None:
        tqdm = sys.modules.get("tqdm")
        if tqdm is not None and getattr(tqdm.tqdm, "_instances", None):  # a progress bar is on the line
            try:
                tqdm.tqdm.write(self.format(record), file=sys.stdout)  # above the bar, not glued to it
                return
            except Exception:
                pass
        super().emit(record)


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = "[curate]" if record.name.startswith("curation") else "[dinotxt]"
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"{prefix} {level}{record.getMessage()}"


def setup_console(level: int = logging.INFO) -> None:
    """Show dinotxt's and curation's messages from ``level`` up on stdout (idempotent)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not any(isinstance(h, _Stdout) for h in logger.handlers):
            handler = _Stdout()
            handler.setFormatter(_Format())
            logger.addHandler(handler)
        logger.propagate = False


# What Lightning says that does not concern a dinotxt user, each with the reason it is dropped
# (``quiet_lightning``): (message pattern, reason)
LIGHTNING_WARNINGS = [
    (r".*module\(s\) in eval mode.*", "the frozen backbone is in eval mode on purpose (FrozenBackbone pins it)"),
    (r".*isinstance\(treespec, LeafSpec\).*", "Lightning's own call of a torch API it has not caught up with"),
    (r".*Couldn't infer the batch indices.*", "the extraction writer keys its outputs by unit, not by batch index"),
]
LIGHTNING_TIPS = [("litlogger", "an advertisement for a cloud logging service, not a message about the run")]


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(pattern in message for pattern, _ in LIGHTNING_TIPS)


def quiet_lightning() -> None:
    """Keep Lightning's warnings and tips that dinotxt causes on purpose off the user's console (the list
    above says why each goes); everything else Lightning says still shows."""
    import warnings

    for pattern, _ in LIGHTNING_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())


def error_line(e: BaseException) -> str:
    """The one line the command line prints for an error: its first line, or for an error raised in a
    DataLoader worker (which torch re-raises as "Caught X in DataLoader worker ... Original Traceback
    ...") the original message, the traceback's last line."""
    lines = str(e).strip().splitlines()
    if not lines:
        return type(e).__name__
    if lines[0].startswith("Caught ") and len(lines) > 1 and "Original Traceback" in lines[1]:
        return lines[-1].split(": ", 1)[-1]
    return lines[0]
