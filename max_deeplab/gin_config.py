"""The gin configuration: where the bundled configs are, and applying config files and
bindings the one way every entry point does (`max_deeplab.configs.load` for Python users,
`--gin_file` / `--gin_bindings` for the verbs).

Applying a config registers every configurable first (`max_deeplab.configurables`), so a
file may name any of them whichever module the caller imported, and lets `include "x.gin"`
find the bundled configs/x.gin. Errors name the file or binding at fault.
"""
from __future__ import annotations

import functools
import inspect
import logging
import os
import tokenize
import types
from collections.abc import Callable, Sequence
from typing import Any, Union, get_args, get_origin

from max_deeplab.file_system import file_exists, is_url


def _find_configs_dir() -> str:
    """The configs/ directory: inside the installed package (setup.py maps the repo's
    top-level configs/ to max_deeplab/configs in a wheel), else the source tree's configs/
    (a checkout or an editable install, where the configs stay at the repo root)."""
    package_dir = os.path.dirname(os.path.abspath(__file__))
    installed = os.path.join(package_dir, "configs")
    if os.path.isdir(installed):
        return installed
    return os.path.join(os.path.dirname(package_dir), "configs")


CONFIGS_DIR = _find_configs_dir()


@functools.cache
def _add_configs_search_path() -> None:
    """Lets `include "x.gin"` find configs/x.gin. Once per process: gin keeps its search
    paths across clear_config(), and repeated adds pile up in its not-found messages."""
    import gin

    gin.add_config_file_search_path(CONFIGS_DIR)


class GinConfigError(ValueError):
    """A gin file or binding that does not parse or binds a wrongly typed value. A ValueError
    so every verb's existing handler for bad configuration reports it (exit 2)."""


# What gin raises while parsing text (not while calling configurables): syntax, an unclosed
# bracket (tokenize), an unknown configurable or parameter (ValueError, also undecodable
# text), an `include` it cannot open (OSError), an `import` of a missing module.
_GIN_PARSE_ERRORS = (SyntaxError, tokenize.TokenError, ValueError, OSError, ImportError)


class _QuietGinIncludeProbe(logging.Filter):
    """gin probes an `include` as a Python-package resource before its search paths and
    logs 'Path not found' at ERROR level even when the search path then finds it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.pathname.endswith(os.path.join("gin", "resource_reader.py"))
                    and record.msg == "Path not found: %s")


logging.getLogger().addFilter(_QuietGinIncludeProbe())


@functools.cache
def _read_urls_with_gfile() -> None:
    """Registers `tf.io.gfile.GFile` as one of gin's file readers (once per process), as
    `gin.tf` would — which no longer imports on TF 2.20 (it subclasses tf.estimator)."""
    import gin
    import tensorflow as tf

    gin.config.register_file_reader(tf.io.gfile.GFile, tf.io.gfile.exists)


def resolve_gin_file(path: str) -> str:
    """Finds a gin file as given, or relative to configs/; clear error otherwise.

    A URL (a run's saved config.gin in a gs:// model directory) is read by gin through
    `tf.io.gfile` (`_read_urls_with_gfile`)."""
    if is_url(path):
        if file_exists(path):
            _read_urls_with_gfile()
            return path
        raise FileNotFoundError(f"gin file not found: {path!r}")
    candidates = [path, os.path.join(CONFIGS_DIR, path)]
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise FileNotFoundError(f"gin file not found: {path!r} (looked in: {', '.join(candidates)})")


def _describe_parse_error(error: Exception) -> str:
    """gin's message with where it happened; its SyntaxError keeps the location in
    attributes (the file may be an `include`d one), TokenError in a bare tuple."""
    if isinstance(error, SyntaxError):
        where = f"{error.filename}, line {error.lineno}" if error.filename else \
            f"line {error.lineno}"
        text = (error.text or "").strip()
        return f"{error.msg} ({where}{': ' + text if text else ''})"
    if isinstance(error, tokenize.TokenError):
        return f"{error.args[0]} (an unclosed bracket or quote?)"
    return str(error)


# Annotations whose values can be checked after parsing: gin passes values through
# unchecked, so `MaXDeepLab.num_classes = "abc"` would otherwise surface as a TypeError deep
# inside model building. Each checkable type (also as a member of a union, e.g. `int | None`)
# with the value types it accepts.
_CHECKABLE_TYPES: dict[Any, tuple[type, ...]] = {
    int: (int,), float: (int, float), bool: (bool,), str: (str,), type(None): (type(None),)}
# Values gin parsed from literals; references (@fn) and macros (%X) resolve later.
_LITERAL_TYPES = (int, float, bool, str, type(None), tuple, list, dict)


def _checkable_members(annotation: Any) -> tuple[Any, ...] | None:
    """The types of a scalar (or union of scalars) annotation; None if not checkable."""
    members = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) \
        else (annotation,)
    return members if all(m in _CHECKABLE_TYPES for m in members) else None


def _check_bound_value_types() -> None:
    """Raises GinConfigError naming the first binding whose literal value does not fit its
    parameter's int / float / bool / str (or None) annotation.

    gin has no public way to list the bound parameters, so this reads its `_CONFIG` and
    `_REGISTRY` (the same in gin-config 0.4 and 0.5)."""
    from gin import config as gin_config

    bound, registry = (getattr(gin_config, "_CONFIG", None),
                       getattr(gin_config, "_REGISTRY", None))
    if not isinstance(bound, dict) or registry is None:
        return  # another gin version: the check is a convenience, the build still fails
    for (scope, selector), values in list(bound.items()):
        configurable = registry.get(selector)
        if configurable is None:
            continue
        try:
            parameters = inspect.signature(configurable.wrapped, eval_str=True).parameters
        except (NameError, TypeError, ValueError):
            continue  # an annotation that does not evaluate at run time: nothing to check
        for name, value in values.items():
            if name not in parameters or type(value) not in _LITERAL_TYPES:
                continue
            members = _checkable_members(parameters[name].annotation)
            if members is None or isinstance(
                    value, tuple(t for m in members for t in _CHECKABLE_TYPES[m])):
                continue
            key = f"{scope + '/' if scope else ''}{configurable.name}.{name}"
            expected = " or ".join("None" if m is type(None) else m.__name__ for m in members)
            raise GinConfigError(f"gin binding {key} = {value!r} ({type(value).__name__}): "
                                 f"expected {expected}")


def parse_config(gin_files: Sequence[str] = (), gin_bindings: Sequence[str] = ()) -> list[str]:
    """Clears gin state and applies the gin files, then the bindings, in order; returns the
    files as resolved (`resolve_gin_file`).

    Raises FileNotFoundError for a gin file that does not exist and GinConfigError naming
    the file or binding (and gin's message) for one that does not parse or binds a value of
    the wrong type.
    """
    import gin

    # Register every configurable before parsing so bindings can name them.
    import max_deeplab.configurables  # noqa: F401

    gin.clear_config()
    _add_configs_search_path()
    resolved_files = [resolve_gin_file(f) for f in gin_files]
    # One file or binding at a time (what gin.parse_config_files_and_bindings does, in the
    # same order) so an error can name the one at fault.
    for path in resolved_files:
        try:
            gin.parse_config_file(path)
        except _GIN_PARSE_ERRORS as e:
            raise GinConfigError(f"invalid gin file {path}: {_describe_parse_error(e)}") from e
    for binding in gin_bindings:
        try:
            gin.parse_config(binding)
        except _GIN_PARSE_ERRORS as e:
            raise GinConfigError(
                f"invalid --gin_bindings value {binding!r}: {_describe_parse_error(e)}") from e
    _check_bound_value_types()
    return resolved_files


def load(name_or_path: str | Sequence[str], bindings: Sequence[str] = ()) -> list[str]:
    """Applies a gin config the way the verbs' --gin_file / --gin_bindings do.

    `name_or_path`: a config file (or a list of them, applied in order): a path, or a name
    in the bundled configs/ directory with or without its ``.gin`` (``"reference_tiny"``,
    ``"ablations/no_p2m.gin"``). Every configurable is registered first and ``include``s
    resolve against configs/ too, so the paper configs and those that include them load
    without importing anything else. `bindings`: gin statements applied after the files,
    e.g. ``["MaXDeepLab.num_classes = 8"]``. Replaces any config applied before.

    Returns the config files as resolved. Raises FileNotFoundError for a missing file and
    GinConfigError (a ValueError) naming the file or binding that does not parse or binds a
    wrongly typed value.

    Example::

        import max_deeplab.configs
        from max_deeplab.model import build_model

        max_deeplab.configs.load("tiny", bindings=["MaXDeepLab.num_classes = 8"])
        model = build_model()
    """
    names = [name_or_path] if isinstance(name_or_path, str) else list(name_or_path)
    return parse_config([_with_gin_suffix(name) for name in names], bindings)


def _with_gin_suffix(name: str) -> str:
    """`name`, or `name` + ".gin" when only that names a file (a bundled config's short name)."""
    if name.endswith(".gin"):
        return name
    try:
        resolve_gin_file(name)
        return name
    except FileNotFoundError:
        return name + ".gin"


def configured_value(configurable_name: str, configurable: Callable, parameter: str) -> Any:
    """The value gin passes `configurable` (registered as `configurable_name`) for
    `parameter`: its binding in the parsed config, else the parameter's default."""
    import gin

    try:
        return gin.query_parameter(f"{configurable_name}.{parameter}")
    except ValueError:  # not bound
        return inspect.signature(configurable).parameters[parameter].default
