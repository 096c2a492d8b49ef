"""`max_deeplab.atomic_files`: readers see the old file or the whole new one, never a part."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from max_deeplab import atomic_files


def test_writes_json_and_creates_the_directory(tmp_path):
    path = str(tmp_path / "run" / "eval" / "metrics.json")
    atomic_files.write_json_atomic(path, {"pq": 0.5, "n": 3}, indent=1)
    with open(path) as f:
        text = f.read()
    assert text.endswith("\n") and json.loads(text) == {"pq": 0.5, "n": 3}
    assert os.listdir(tmp_path / "run" / "eval") == ["metrics.json"]  # no temporary left


def test_default_converts_what_json_cannot(tmp_path):
    np = pytest.importorskip("numpy")
    path = str(tmp_path / "m.json")
    with pytest.raises(TypeError):
        atomic_files.write_json_atomic(path, {"pq": np.float32(0.25)})
    assert not os.path.exists(path) and os.listdir(tmp_path) == []
    atomic_files.write_json_atomic(path, {"pq": np.float32(0.25)}, default=float)
    with open(path) as f:
        assert json.load(f) == {"pq": 0.25}


def test_text_is_utf8_whatever_the_locale(tmp_path):
    # A process whose locale encoding is ASCII (C locale, no UTF-8 mode or coercion), as on
    # some batch hosts: gin configs hold non-ASCII text (docstrings, ẑ) and must still write.
    path = str(tmp_path / "operative_config.gin")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    code = ("import sys; from max_deeplab.atomic_files import write_text_atomic; "
            "write_text_atomic(sys.argv[1], chr(0x1E91) + chr(10))")
    subprocess.run([sys.executable, "-c", code, path], check=True, env=env)
    with open(path, "rb") as f:
        assert f.read() == "\u1e91\n".encode()


def test_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path, monkeypatch):
    path = str(tmp_path / "config.gin")
    atomic_files.write_text_atomic(path, "old\n")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic_files.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_files.write_text_atomic(path, "new\n")
    with open(path) as f:
        assert f.read() == "old\n"
    assert os.listdir(tmp_path) == ["config.gin"]


def test_urls_go_through_tf_gfile():
    tf = pytest.importorskip("tensorflow")
    path = "ram://atomic_files_test/run/metrics.json"
    atomic_files.write_json_atomic(path, {"step": 7})
    assert json.loads(tf.io.gfile.GFile(path).read()) == {"step": 7}
    atomic_files.write_text_atomic(path, "replaced\n")
    assert tf.io.gfile.GFile(path).read() == "replaced\n"
    assert tf.io.gfile.listdir("ram://atomic_files_test/run") == ["metrics.json"]
