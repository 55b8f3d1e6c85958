"""User reward functions given as "pkg.module:function", and final-answer extraction.

A reward function follows TRL's signature and is called with keywords:
`f(prompts=[...], completions=[...], **columns) -> list[float]`, where `columns` are the
dataset's other columns as lists (`answer=[...]`, `task=[...]`, ...).
"""
from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any, Callable

__all__ = ["load_callable", "extract_final_answer"]


def _import_module(module_path: str, spec: str):
    if module_path.endswith(".py"):
        file = Path(module_path).expanduser()
        if not file.is_file():
            raise ImportError(f"reward function {spec!r}: file {str(file)!r} does not exist")
        name = f"bridgerl_user_{file.stem}_{abs(hash(str(file.resolve())))}"
        if name in sys.modules:
            return sys.modules[name]
        module_spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        return module
    try:
        return importlib.import_module(module_path)
    except ModuleNotFoundError as exc:
        if exc.name and module_path.startswith(exc.name):  # the module itself (or a parent) is missing
            raise ImportError(
                f"reward function {spec!r}: no module named {module_path!r}; check the spelling, that the "
                "package is installed, or that its folder is on PYTHONPATH (a file path ending in .py also "
                "works)") from exc
        raise ImportError(f"reward function {spec!r}: importing {module_path!r} failed: {exc}") from exc


def load_callable(spec: str) -> Callable:
    """The object named by "pkg.module:function" (or "path/to/file.py:function", or "mod:Class.attr")."""
    module_path, sep, attr_path = spec.rpartition(":")
    if not sep or not module_path or not attr_path:
        raise ValueError(f"expected 'package.module:function' (or 'file.py:function'), got {spec!r}")
    obj: Any = _import_module(module_path, spec)
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"reward function {spec!r}: {module_path!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"reward function {spec!r} is a {type(obj).__name__}, not a callable")
    return obj


_ANSWER_TAG = re.compile(r"<answer>\s?(.*?)\s?</answer>", re.DOTALL)


def _last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), with nested braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def extract_final_answer(completion: str) -> str | None:
    """The answer in the last `<answer>…</answer>` tag, else the last `\\boxed{…}`, else None."""
    tags = _ANSWER_TAG.findall(completion)
    if tags:
        return tags[-1].strip()
    return _last_boxed(completion)
