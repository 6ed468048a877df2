"""Load a user's model through a factory function named `"module:function"` or `"path/to/file.py:function"`.

SECURITY: this imports and runs the user's own Python code (the module body, then the function), exactly
as `python path/to/file.py` would. Only point it at code you trust. Nothing is evaluated from strings: the
spec is split at its last ':', the module is imported by name (or executed from the file), and the function is
looked up with `getattr`, one dotted attribute at a time.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from fewstep_search.models.errors import ModelLoadError

__all__ = ["parse_factory_spec", "resolve_factory", "load_factory", "check_kwargs"]

_FORMAT = "expected 'module:function' or 'path/to/file.py:function'"


def parse_factory_spec(spec: str) -> tuple[str, str]:
    """Split `spec` into (module name or .py path, dotted attribute path); ValueError on a malformed spec."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"factory spec {spec!r} has no ':'; {_FORMAT}")
    module, _, attr = spec.strip().rpartition(":")
    if not module or not attr:
        raise ValueError(f"factory spec {spec!r} is missing the module or the function; {_FORMAT}")
    if not all(part.isidentifier() for part in attr.split(".")):
        raise ValueError(f"factory spec {spec!r}: {attr!r} is not a (dotted) Python name; {_FORMAT}")
    if not _is_file_spec(module) and not all(part.isidentifier() for part in module.split(".")):
        raise ValueError(
            f"factory spec {spec!r}: {module!r} is neither a module name nor a .py file; {_FORMAT}"
        )
    return module, attr


def resolve_factory(spec: str, *, base_dir: Path | str | None = None) -> Callable[..., Any]:
    """The callable named by `spec` (imports the module: runs user code); relative .py paths use base_dir."""
    module_part, attr = parse_factory_spec(spec)
    module = _import(module_part, base_dir=base_dir)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelLoadError(f"factory {spec!r}: {module_part!r} has no attribute {part!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelLoadError(f"factory {spec!r}: {attr!r} is a {type(obj).__name__}, not a function")
    return obj


def load_factory(
    spec: str, *, kwargs: Mapping[str, Any] | None = None, base_dir: Path | str | None = None
) -> Callable[..., Any]:
    """Import `spec`, call the function with `**kwargs`, and return what it built (a `Denoiser`).

    Runs the user's own code (see the module docstring). Errors raised inside the user's function propagate
    unchanged (their traceback is the useful one); a bad spec, a missing module/function, arguments the
    function does not accept, or a non-callable result raise `ValueError` / `ModelLoadError` (one line).

    Example (my_models.py defines `def make(device="cpu"): ...` returning a Denoiser):
        >>> den = load_factory("my_models.py:make", kwargs={"device": "cpu"})  # doctest: +SKIP
    """
    fn = resolve_factory(spec, base_dir=base_dir)
    kw = dict(kwargs or {})
    check_kwargs(fn, kw, what=f"factory {spec!r}")
    model = fn(**kw)
    if not callable(model):
        raise ModelLoadError(
            f"factory {spec!r} returned a {type(model).__name__}, not a Denoiser D(x, sigma)"
        )
    return model


def check_kwargs(fn: Callable[..., Any], kwargs: Mapping[str, Any], *, what: str) -> None:
    """Fail with a clear message if `fn(**kwargs)` would not bind (validation only; nothing is dropped)."""
    bad = [k for k in kwargs if not isinstance(k, str)]
    if bad:
        raise ValueError(f"{what}: option names must be strings, got {bad!r}")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: let the call itself decide
        return
    try:
        sig.bind(**kwargs)
    except TypeError as e:
        raise ValueError(f"{what}: {e} (it accepts: {', '.join(sig.parameters) or 'nothing'})") from e


def _is_file_spec(module: str) -> bool:
    return module.endswith(".py") or "/" in module or "\\" in module


def _import(module: str, *, base_dir: Path | str | None) -> ModuleType:
    if _is_file_spec(module):
        path = Path(module).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        return _import_file(path.resolve())
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and (module == e.name or module.startswith(e.name + ".")):
            raise ModelLoadError(
                f"factory module {module!r} not found (is it installed or on PYTHONPATH?)"
            ) from e
        raise ModelLoadError(f"importing factory module {module!r} failed: {e}") from e


def _import_file(path: Path) -> ModuleType:
    """Execute a .py file as a module, with its folder on sys.path (as `python file.py` would have it)."""
    if not path.is_file():
        raise ModelLoadError(f"factory file {path} does not exist")
    if path.suffix != ".py":
        raise ModelLoadError(f"factory file {path} is not a .py file")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    name = f"_fewstep_factory_{path.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"factory file {path} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before exec, so dataclasses / pickling inside the file can find it
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
