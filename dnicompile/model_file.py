"""Load the user's model.py and build the model it names, with errors that point into the user's file."""

from __future__ import annotations

import importlib.util
import sys
import traceback
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import torch.nn as nn

from .errors import ModelError, did_you_mean

DEFAULT_NAMES = ("model", "build_model")


def user_frame(tb: Any, files: set[str] | None = None) -> str:
    """'file:line in func' of the innermost traceback frame in the user's code (not torch, not dnicompile)."""
    frames = traceback.extract_tb(tb)
    pkg_dir = str(Path(__file__).resolve().parent)
    torch_dir = str(Path(nn.__file__).resolve().parent.parent)
    chosen = None
    for fr in frames:
        path = str(Path(fr.filename).resolve()) if not fr.filename.startswith("<") else fr.filename
        if files is not None:
            if path in files:
                chosen = fr
        elif not path.startswith((pkg_dir, torch_dir)) and not fr.filename.startswith("<"):
            chosen = fr
    if chosen is None:
        return ""
    return f"{chosen.filename}:{chosen.lineno} in {chosen.name}" + (f": `{chosen.line}`" if chosen.line else "")


def load_module(path: str | Path) -> ModuleType:
    """Import a Python file by path; its folder goes on sys.path so it can import its neighbours."""
    path = Path(path)
    if not path.is_file():
        hint = " (it is a directory)" if path.is_dir() else ""
        raise ModelError(
            f"model file {str(path)!r} not found{hint}; pass the path of a Python file defining your model."
        )
    if path.suffix != ".py":
        raise ModelError(f"model file {str(path)!r} is not a .py file; pass the Python file that defines your model.")
    name = f"_dnicompile_user_{path.stem}_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ModelError(f"{e.filename}:{e.lineno}:{e.offset or 0}: syntax error in model file: {e.msg}") from None
    except Exception as e:  # the user's module body raised
        where = user_frame(e.__traceback__, {str(path.resolve())}) or str(path)
        raise ModelError(f"importing model file {str(path)!r} failed at {where}: {type(e).__name__}: {e}") from None
    return module


def build_model(path: str | Path, name: str | None = None, kwargs: dict | None = None) -> nn.Module:
    """The nn.Module that `name` (default: `model`, then `build_model`) in the file is, or that it builds."""
    module = load_module(path)
    if name is None:
        name = next((n for n in DEFAULT_NAMES if hasattr(module, n)), None)
        if name is None:
            found = [n for n, v in vars(module).items() if callable(v) or isinstance(v, nn.Module)]
            raise ModelError(
                f"{path}: defines neither `model` nor `build_model`; set `model: NAME` in the spec to the factory "
                f"function or nn.Module to use{did_you_mean('model', found)}."
            )
    if not hasattr(module, name):
        found = [n for n in vars(module) if not n.startswith("_")]
        raise ModelError(f"{path}: has no attribute `{name}` (spec key `model`){did_you_mean(name, found)}.")
    obj = getattr(module, name)
    if isinstance(obj, nn.Module):
        if kwargs:
            raise ModelError(f"{path}: `{name}` is an nn.Module instance, so `model_args` cannot be applied to it.")
        return obj
    if not callable(obj):
        raise ModelError(f"{path}: `{name}` is a {type(obj).__name__}, not an nn.Module or a function returning one.")
    try:
        built = obj(**(kwargs or {}))
    except TypeError as e:
        where = user_frame(e.__traceback__, {str(Path(path).resolve())})
        if not where:
            raise ModelError(f"{path}: calling `{name}` with model_args {kwargs or {}} failed: {e}") from None
        raise ModelError(f"{path}: `{name}` raised at {where}: TypeError: {e}") from None
    except Exception as e:
        where = user_frame(e.__traceback__) or path
        raise ModelError(f"{path}: `{name}()` raised at {where}: {type(e).__name__}: {e}") from None
    if not isinstance(built, nn.Module):
        raise ModelError(f"{path}: `{name}()` returned a {type(built).__name__}; it must return a torch.nn.Module.")
    return built
