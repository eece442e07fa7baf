"""Bad input through the real CLI: a clear error and an intact (or absent) run directory."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from tests.conftest import REPO, tiny_config


def u2a(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "u2a_dist", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout)


def write_config(path, cfg: dict):
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_malformed_row_names_file_and_line_and_creates_no_run_dir(tmp_path):
    forget = tmp_path / "forget.jsonl"
    forget.write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n{oops\n")
    out = tmp_path / "run"
    cfg = tiny_config(out, data={"forget": {"path": str(forget), "schema": "pairs",
                                            "field": "rejected"}})
    res = u2a("run", "--config", write_config(tmp_path / "c.yaml", cfg))
    assert res.returncode == 2, res.stderr
    assert f"{forget}:2: malformed JSON" in res.stderr
    assert not out.exists()


def test_missing_field_and_empty_forget_set(tmp_path):
    forget = tmp_path / "forget.jsonl"
    forget.write_text(json.dumps({"prompt": "p", "chosen": "c"}) + "\n")
    cfg = tiny_config(tmp_path / "run", data={"forget": {"path": str(forget), "schema": "pairs",
                                                         "field": "rejected"}})
    res = u2a("run", "--config", write_config(tmp_path / "c.yaml", cfg))
    assert res.returncode == 2 and f"{forget}:1: missing field 'rejected'" in res.stderr
    forget.write_text("")
    res = u2a("run", "--config", write_config(tmp_path / "c.yaml", cfg))
    assert res.returncode == 2 and "no completions" in res.stderr
    assert not (tmp_path / "run").exists()


def test_unknown_key_is_named(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    cfg["unlearn"]["learning_rate"] = 1.0
    res = u2a("run", "--config", write_config(tmp_path / "c.yaml", cfg))
    assert res.returncode == 2 and "unlearn.learning_rate" in res.stderr


def test_a_different_config_does_not_overwrite_a_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    cfg = tiny_config(out)
    (out / "config.yaml").write_text(yaml.safe_dump({**cfg, "unlearn": {**cfg["unlearn"],
                                                                        "lr": 0.5}}))
    res = u2a("run", "--config", write_config(tmp_path / "c.yaml", cfg))
    assert res.returncode == 2 and "holds a different run" in res.stderr


def test_a_device_the_machine_lacks_is_named_before_any_rank_starts(tmp_path):
    """`runtime.device: cuda` without CUDA devices: the key and the count in one line, exit 2,
    no run directory; an unknown device is refused by the config's own validation."""
    import torch

    if torch.cuda.device_count() >= 2:
        import pytest

        pytest.skip("this machine has the GPUs the config asks for")
    out = tmp_path / "run"
    cfg = tiny_config(out, runtime={"device": "cuda"})
    res = u2a("run", "--config", write_config(tmp_path / "c.yaml", cfg))
    assert res.returncode == 2, res.stderr
    assert "runtime.device: 'cuda' with runtime.world_size=2 needs 2 CUDA device(s)" in res.stderr
    assert not out.exists()
    cfg = tiny_config(out, runtime={"device": "tpu"})
    res = u2a("run", "--config", write_config(tmp_path / "c.yaml", cfg))
    assert res.returncode == 2 and "runtime.device" in res.stderr and "'tpu'" in res.stderr
    assert not out.exists()
