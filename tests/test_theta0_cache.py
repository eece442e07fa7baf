"""θ0's work kept between runs (``runtime.theta0_cache``): an entry is read back exactly, any
change of what it depends on misses, an unreadable entry is recomputed, and a 2-rank run that
reads every θ0 result from the cache logs the same metrics as the run that computed them."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import tiny_config
from tests.test_nothing_lost import u2a
from tests.test_recipe import HELD_OUT
from u2a_dist.config import config_from_dict
from u2a_dist.generation import Share
from u2a_dist.theta0_cache import Theta0Cache, run_context

CTX = {"format": 1, "model": {"preset": "tiny-gpt2", "seed": 0}}
IDS = [[1, 2, 3], [4, 5]]
SETTINGS = {"batch_size": 2, "max_new_tokens": 4}


class Counter:
    def __init__(self, value) -> None:
        self.value, self.calls = value, 0

    def __call__(self):
        self.calls += 1
        return self.value


def share() -> Share:
    return Share([0, 1], ["a b", ""], [[7, 8, 0], []])


def test_entries_are_read_back_exactly_and_any_change_misses(tmp_path: Path) -> None:
    gen, ten = Counter(share()), Counter({"x": torch.tensor([1.5, float("nan")]),
                                          "y": torch.arange(3)})
    first = Theta0Cache(tmp_path, CTX)
    assert first.generations("g", IDS, SETTINGS, gen) == share()
    first.tensors("t", {"items": IDS}, ten)
    assert (gen.calls, ten.calls, first.hits) == (1, 1, [])

    again = Theta0Cache(tmp_path, dict(CTX))
    assert again.generations("g", IDS, SETTINGS, gen) == share()
    out = again.tensors("t", {"items": IDS}, ten)
    torch.testing.assert_close(out["x"], ten.value["x"], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(out["y"], ten.value["y"]) and out["y"].dtype == torch.int64
    assert (gen.calls, ten.calls, again.hits) == (1, 1, ["g", "t"])

    # another model seed, prompt, setting or input: computed again
    other = Theta0Cache(tmp_path, {**CTX, "model": {"preset": "tiny-gpt2", "seed": 1}})
    other.generations("g", IDS, SETTINGS, gen)
    again.generations("g", [[1, 2, 3], [4, 6]], SETTINGS, gen)
    again.generations("g", IDS, {**SETTINGS, "max_new_tokens": 5}, gen)
    again.tensors("t", {"items": IDS[:1]}, ten)
    assert (gen.calls, ten.calls) == (4, 2)

    # no directory: nothing kept, everything computed
    off = Theta0Cache(None, CTX)
    off.generations("g", IDS, SETTINGS, gen)
    assert gen.calls == 5 and off.hits == []
    assert {p.suffix for p in (tmp_path / "theta0").iterdir()} == {".json", ".safetensors"}


def test_an_unreadable_entry_is_recomputed_not_trusted(tmp_path: Path, caplog) -> None:
    gen, ten = Counter(share()), Counter({"x": torch.ones(2)})
    cache = Theta0Cache(tmp_path, CTX)
    cache.generations("g", IDS, SETTINGS, gen)
    cache.tensors("t", {}, ten)
    entries = sorted((tmp_path / "theta0").iterdir())
    for path in entries:  # torn mid-write by something else
        path.write_bytes(path.read_bytes()[:20])
    with caplog.at_level(logging.WARNING, logger="u2a_dist.theta0_cache"):
        assert cache.generations("g", IDS, SETTINGS, gen) == share()
        cache.tensors("t", {}, ten)
    assert (gen.calls, ten.calls, cache.hits) == (2, 2, [])
    assert sum("cannot be used" in r.getMessage() for r in caplog.records) == 2
    # rewritten whole: read back now
    cache.generations("g", IDS, SETTINGS, gen)
    assert gen.calls == 2 and cache.hits == ["g"]

    # an entry copied under another key's name (its own key inside differs): not trusted
    json_entry = next(p for p in entries if p.suffix == ".json")
    entry = json.loads(json_entry.read_text())
    entry["texts"] = ["forged", "x"]
    other = Theta0Cache(tmp_path, {**CTX, "dtype": "bfloat16"})
    other.generations("g", IDS, SETTINGS, gen)
    moved = sorted(set((tmp_path / "theta0").iterdir()) - set(entries))[0]
    moved.write_text(json.dumps(entry))
    assert other.generations("g", IDS, SETTINGS, gen) == share() and gen.calls == 4


def test_the_context_names_the_model_files_or_the_preset_and_seed(tmp_path: Path) -> None:
    cfg = config_from_dict(tiny_config(tmp_path / "run"))
    cpu = torch.device("cpu")
    preset = run_context(cfg, "tiny-gpt2", 2, cpu)
    assert preset["model"] == {"preset": "tiny-gpt2", "seed": 0}
    cfg.runtime.seed = 3
    assert run_context(cfg, "tiny-gpt2", 2, cpu)["model"]["seed"] == 3
    assert run_context(cfg, "tiny-gpt2", 1, cpu) != run_context(cfg, "tiny-gpt2", 2, cpu)
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"1234")
    before = run_context(cfg, str(model), 2, cpu)
    os.utime(model / "model.safetensors", ns=(1, 1))  # rewritten in place: a new mtime
    assert run_context(cfg, str(model), 2, cpu) != before
    assert before["versions"]["torch"] and before["versions"]["transformers"]


def _metrics(run: Path) -> list[dict]:
    """metrics.jsonl without what depends on the clock or the machine's load."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if "time" not in k and not k.startswith(
        ("timing/", "memory", "progress")) and not k.endswith("_s")} for r in rows]


@pytest.mark.slow
def test_a_two_rank_run_reads_every_theta0_result_and_logs_the_same_metrics(
        tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    retain = {"path": "builtin:harmless", "schema": "prompts", "split": "train", "limit": 6}

    def launch(name: str) -> dict:
        cfg = tiny_config(tmp_path / name, data={"retain": retain},
                          unlearn={"loss": "npo", "steps": 3, "retain_kl_weight": 1.0},
                          eval={**HELD_OUT, "every": 3, "target": None},
                          runtime={"theta0_cache": str(cache)})
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        res = u2a("run", "--config", str(path))
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads((tmp_path / name / "summary.json").read_text())

    first = launch("first")
    assert first["theta0_cached"] == []
    second = launch("second")
    # retain answers, the forget set's (NPO) and held-out pairs' reference log-probs, the
    # step-0 evaluation's harmful and harmless answers
    assert len(second["theta0_cached"]) == 5, second["theta0_cached"]
    assert sum(w.startswith("retain answers") for w in second["theta0_cached"]) == 1
    assert _metrics(tmp_path / "second") == _metrics(tmp_path / "first")
    assert second["samples"] == first["samples"]
