"""What `train` records in a model directory so that later verbs need no repeated flags.

``DIR/config.gin`` is the gin config the run was built from; ``DIR/run.json`` its data flags
(``{"train_data": GLOB, "eval_data": GLOB}``). A resumed `train`, `evaluate` and `export`
read them when --gin_file / --train_data / --eval_data are not given. The data globs are
stored absolute (URLs and ``tfds:`` sources as given), so that they resolve wherever the
next verb is run from. No TensorFlow is imported here for local paths.
"""
from __future__ import annotations

import json
import os

from max_deeplab.atomic_files import write_text_atomic
from max_deeplab.file_system import file_exists, is_url, read_text

RUN_CONFIG_GIN = "config.gin"
RUN_CONFIG_JSON = "run.json"
DATA_FLAGS = ("train_data", "eval_data")


class RunConfigError(ValueError):
    """A run directory's `run.json` is unreadable or not what `train` writes (names it)."""


def absolute_data_pattern(pattern: str | None) -> str | None:
    """`pattern` (comma-separated globs) with each local glob made absolute; URLs and
    ``tfds:<name>:<split>`` sources unchanged."""
    if not pattern:
        return pattern
    parts = []
    for part in pattern.split(","):
        part = part.strip()
        parts.append(part if is_url(part) or part.startswith("tfds:")
                     else os.path.abspath(os.path.expanduser(part)))
    return ",".join(parts)


def save_run_config(model_dir: str, **data_flags: str | None) -> None:
    """Saves the gin config and the data flags (made absolute) in the model directory, so
    `evaluate`, `export` and resumed runs rebuild the same model without repeating them."""
    import gin

    data = {name: absolute_data_pattern(value) for name, value in data_flags.items()}
    for name, text in ((RUN_CONFIG_GIN, gin.config_str()),
                       (RUN_CONFIG_JSON, json.dumps(data, indent=1))):
        write_text_atomic(f"{model_dir.rstrip('/')}/{name}", text)


def saved_gin_config(model_dir: str) -> str | None:
    """DIR/config.gin, the model config `train` saved in `model_dir`, if it is there."""
    path = os.path.join(model_dir, RUN_CONFIG_GIN)
    return path if file_exists(path) else None


def saved_data_flags(model_dir: str) -> dict[str, str | None]:
    """The data flags (`train_data`, `eval_data`) `train` recorded in DIR/run.json; {} when
    there is no run.json (e.g. a directory from `import-checkpoint`).

    Raises:
      RunConfigError: run.json is unreadable, not JSON, or not an object of data globs.
    """
    path = os.path.join(model_dir, RUN_CONFIG_JSON)
    try:
        if not file_exists(path):
            return {}
        data = json.loads(read_text(path))
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8 text
        raise RunConfigError(f"cannot read the run config {path} (written by `train`): "
                             f"{e}") from e
    if not isinstance(data, dict):
        raise RunConfigError(f"run config {path} holds a JSON {type(data).__name__}; expected "
                             'an object like {"train_data": GLOB, "eval_data": GLOB}')
    for key in DATA_FLAGS:
        if data.get(key) is not None and not isinstance(data[key], str):
            raise RunConfigError(f"run config {path}: {key!r} must be a file glob (a string) "
                                 f"or null, got {data[key]!r}")
    return data
