"""Code named by a setting: ``package.module:attribute`` import paths, imported only on opt-in.

A checkpoint's ``config.yaml``, a recipe or an evaluation suite can name code to run: a
backbone factory (``model.backbone.name``), a model loader (``model.loader``), a caption
encoder (``embed.text_encoder``). Files are data: users load checkpoints and recipes made
by other people, and a file that names ``subprocess:run`` must not run a command. So an
import path is only imported when the caller passes ``trust_code=True`` (on the command
line ``--trust-code``), as Hugging Face transformers asks for ``trust_remote_code``.
Registered names (timm architectures, the built-in text encoder) need no opt-in.
"""
from __future__ import annotations

import importlib
from typing import Any


class UntrustedCodeError(ValueError):
    """A setting names code to import and the caller did not opt in."""


def module_installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (a broken or blocked install: False)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def is_import_path(spec: Any) -> bool:
    """``package.module:attribute`` (a colon with text on both sides)."""
    if not isinstance(spec, str):
        return False
    module, sep, attr = spec.partition(":")
    return bool(sep and module and attr)


def import_object(spec: str, *, trust_code: bool, setting: str) -> Any:
    """Import ``package.module:attribute`` named by ``setting`` (for messages: e.g. ``model.backbone.name``).

    Raises:
        UntrustedCodeError: ``trust_code`` is False; the message names the path and the opt-in.
        ImportError: the module or the attribute does not exist.
    """
    if not is_import_path(spec):
        raise ValueError(f"{setting}={spec!r} is not an import path of the form 'package.module:attribute'")
    if not trust_code:
        raise UntrustedCodeError(
            f"{setting}={spec!r} names code to import and call; dinotxt only runs code named by a setting when you "
            "opt in: pass trust_code=True (command line: --trust-code) if you trust whoever wrote it")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"cannot import module '{module_name}' named by {setting}={spec!r}: {e}") from None
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise ImportError(f"module '{module_name}' has no attribute '{attr}' ({setting}={spec!r})") from None
    return obj


def lazy_attributes(package: str, api: dict):
    """A module ``__getattr__`` (PEP 562) importing ``name`` from ``package.<api[name]>`` on first use,
    so a package facade costs nothing to import (``dinotxt --help`` never loads torch)."""

    def __getattr__(name: str):
        if name not in api:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{api[name]}"), name)
        setattr(importlib.import_module(package), name, value)
        return value

    return __getattr__


__all__ = ["UntrustedCodeError", "import_object", "is_import_path", "lazy_attributes"]
