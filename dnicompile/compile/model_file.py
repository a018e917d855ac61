"""Load the user's model.py and build the model it names, with errors that point into the user's file."""

from __future__ import annotations

import importlib.util
import inspect
import linecache
import sys
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch.nn as nn

from ..errors import ModelError, close_matches, did_you_mean

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


_PKG_DIR = str(Path(__file__).resolve().parent)
_TORCH_DIR = str(Path(nn.__file__).resolve().parent.parent)
_PY_LIB_DIR = str(Path(inspect.__file__).resolve().parent)


def user_site(skip: int = 1) -> str:
    """'file:line: `code`' of the innermost frame on the current call stack that is the user's code.

    Cheap (no source read unless found): the tracer calls it for every node it creates.
    """
    frame = sys._getframe(skip)
    while frame is not None:
        name = frame.f_code.co_filename
        stdlib = name.startswith(_PY_LIB_DIR) and "-packages" not in name
        if not name.startswith(("<", _PKG_DIR, _TORCH_DIR)) and not stdlib:
            line = frame.f_lineno
            code = linecache.getline(name, line).strip()
            return f"{name}:{line}" + (f": `{code}`" if code else "")
        frame = frame.f_back
    return ""


def nearby_file(path: Path) -> str | None:
    """The name of the .py file beside `path` closest to its name, for a did-you-mean (None: none close)."""
    try:
        nearby = sorted(q.name for q in path.parent.glob("*.py"))[:200]
    except OSError:
        return None
    close = close_matches(path.name, nearby, n=1)
    return close[0] if close else None


def load_module(path: str | Path) -> ModuleType:
    """Import a Python file by path; its folder goes on sys.path so it can import its neighbours."""
    path = Path(path)
    if path.is_dir():
        raise ModelError(
            f"model file {str(path)!r} is a directory; pass the path of a Python file defining your model."
        )
    if not path.is_file():
        close = nearby_file(path)
        hint = f" (did you mean {str(path.parent / close)!r}?)" if close else ""
        raise ModelError(
            f"model file {str(path)!r} not found{hint}; pass the path of a Python file defining your model."
        )
    if path.suffix != ".py":
        raise ModelError(f"model file {str(path)!r} is not a .py file; pass the Python file that defines your model.")
    return exec_file(path, "model file", ModelError)


def exec_file(path: Path, what: str, error: type[Exception], prefix: str = "") -> ModuleType:
    """Import the Python file at `path` as a new module, its folder on sys.path so that it can import its
    neighbours. What it raises while importing becomes `error`, located at the line of the file that raised
    (`what` names the file in messages: "model file", "data loader file"; `prefix` goes before them)."""
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
        code = f": `{e.text.strip()}`" if e.text and e.text.strip() else ""
        raise error(f"{e.filename}:{e.lineno}:{e.offset or 0}: syntax error in {what}: {e.msg}{code}") from None
    except Exception as e:  # the user's module body raised
        where = user_frame(e.__traceback__, {str(path.resolve())}) or str(path)
        raise error(f"{prefix}importing {what} {str(path)!r} failed at {where}: {type(e).__name__}: {e}") from None
    except (SystemExit, KeyboardInterrupt) as e:  # script code at the top level: sys.exit(), or an interrupt
        where = user_frame(e.__traceback__, {str(path.resolve())}) or str(path)
        hint = (
            f"dnicompile imports the {what}, so code at its top level runs; put script code (argument parsing, "
            "training, sys.exit) under `if __name__ == '__main__':`."
        )
        raise error(f"{prefix}importing {what} {str(path)!r} {_stopped(e)} at {where}. {hint}") from None
    return module


def _stopped(e: BaseException) -> str:
    """'called sys.exit(3)' or 'was interrupted (KeyboardInterrupt)'."""
    if isinstance(e, SystemExit):
        return f"called sys.exit({e.code!r})" if e.code is not None else "called sys.exit()"
    return "was interrupted (KeyboardInterrupt raised)"


def _def_site(obj: Any, path: str | Path) -> str:
    """`file:line` where a function or class is defined (the file as the user named it), or the file alone."""
    try:
        line = inspect.getsourcelines(obj)[1]
    except (OSError, TypeError):
        return str(path)
    return f"{path}:{line}"


def _candidates(module: ModuleType) -> list[str]:
    """Names in the user's file that could be the model: its functions and classes, and nn.Module instances."""
    out = []
    for n, v in vars(module).items():
        if n.startswith("_"):
            continue
        if isinstance(v, nn.Module):
            out.append(n)
        elif (inspect.isfunction(v) or inspect.isclass(v)) and getattr(v, "__module__", None) == module.__name__:
            out.append(n)
    return out


def build_model(
    path: str | Path,
    name: str | None = None,
    kwargs: dict | None = None,
    where: Callable[..., str] | None = None,
) -> nn.Module:
    """The nn.Module that `name` (default: `model`, then `build_model`) in the file is, or that it builds.

    `where` (the spec's `Spec.where`) locates the spec's `model:` and `model_args:` keys in errors about them.
    """
    module = load_module(path)
    at_key = f"{where('model')}: " if where is not None and name is not None else ""
    at_args = f" ({where('model_args')})" if where is not None and kwargs else ""
    if name is None:
        name = next((n for n in DEFAULT_NAMES if hasattr(module, n)), None)
        if name is None:
            found = _candidates(module)
            listed = f" It defines: {', '.join(found)}." if found else ""
            raise ModelError(
                f"{path}: defines neither `model` nor `build_model`; set `model: NAME` in the spec to the factory "
                f"function, class or nn.Module to use{did_you_mean('model', found)}.{listed}"
            )
    if not hasattr(module, name):
        found = _candidates(module) or [n for n in vars(module) if not n.startswith("_")]
        close = did_you_mean(name, found)
        listed = "" if close else (f" It defines: {', '.join(found)}." if found else "")
        raise ModelError(f"{at_key}{path}: has no attribute `{name}` (spec key `model`){close}.{listed}")
    obj = getattr(module, name)
    if isinstance(obj, nn.Module):
        if kwargs:
            raise ModelError(
                f"{at_key}{path}: `{name}` is an nn.Module instance, so `model_args` cannot be applied to it; "
                "remove `model_args` or name a factory function."
            )
        return obj
    if not callable(obj):
        raise ModelError(
            f"{at_key}{path}: `{name}` is a {type(obj).__name__}, not an nn.Module or a function returning one."
        )
    site = _def_site(obj, path)
    try:
        built = obj(**(kwargs or {}))
    except TypeError as e:
        raised_at = user_frame(e.__traceback__, {str(Path(path).resolve())})
        if not raised_at:
            try:
                signature = f"{name}{inspect.signature(obj)}"
            except (TypeError, ValueError):
                signature = name
            raise ModelError(
                f"{site}: calling `{signature}` with model_args {kwargs or {}}{at_args} failed: {e}. "
                "Make `model_args` in the spec match the factory's parameters."
            ) from None
        raise ModelError(f"{path}: `{name}` raised at {raised_at}: TypeError: {e}") from None
    except Exception as e:
        raised_at = user_frame(e.__traceback__) or site
        raise ModelError(f"{path}: `{name}()` raised at {raised_at}: {type(e).__name__}: {e}") from None
    except (SystemExit, KeyboardInterrupt) as e:
        raised_at = user_frame(e.__traceback__) or site
        raise ModelError(
            f"{path}: `{name}()` {_stopped(e)} at {raised_at}; a model factory must return the model."
        ) from None
    if not isinstance(built, nn.Module):
        raise ModelError(
            f"{site}: `{name}()` returned a {type(built).__name__}; it must return a torch.nn.Module "
            "(e.g. `return Net()`)."
        )
    return built
