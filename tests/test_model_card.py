"""The model card of an export (u2a_dist.model_card): Hub front matter, the before → after table
with Wilson 95% intervals, the reproduce command, and that the export paths write it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_config
from u2a_dist.config import config_from_dict
from u2a_dist.model_card import build_model_card

Z = 1.959963984540054


def hand_wilson(k: int, n: int) -> tuple[float, float]:
    """Wilson (1927) written out: (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)."""
    p = k / n
    centre = p + Z * Z / (2 * n)
    half = Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n))
    return (centre - half) / (1 + Z * Z / n), (centre + half) / (1 + Z * Z / n)


def small_config(tmp_path: Path):
    return config_from_dict(tiny_config(tmp_path / "run", unlearn={
        "loss": "npo", "npo_beta": 0.2, "forget_weight": 0.5, "mismatch_weight": 1.0},
        data={"mismatch": {"path": "builtin:refusal_templates", "schema": "completions"}},
        eval={"target": None, "harmful_prompts": {"path": "builtin:harmful",
                                                  "schema": "prompts", "split": "eval"},
              "harmless_prompts": {"path": "builtin:harmless", "schema": "prompts",
                                   "split": "eval", "source": "alpaca"}}))


SUMMARY = {
    "step": 6, "stopped": "budget", "world_size": 2,
    "before": {"eval/harmful_rate@harmful": 0.5, "eval/count@harmful": 10.0,
               "eval/held_out@harmful": 0.0, "eval/harmful_rate": 0.5,
               "eval/count_harmful": 10.0, "pa/accuracy": 0.6, "forget/nll": 2.5,
               "timing/eval_s": 1.0},
    "after": {"eval/harmful_rate@harmful": 0.3, "eval/count@harmful": 10.0,
              "eval/held_out@harmful": 0.0, "eval/harmful_rate": 0.3,
              "eval/count_harmful": 10.0, "pa/accuracy": 0.8, "forget/nll": 4.0,
              "eval/over_refusal@alpaca": 0.0, "eval/count@alpaca": 4.0,
              "eval/held_out@alpaca": 1.0, "timing/eval_s": 1.0},
}


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def _row(card: str, metric: str) -> list[str]:
    rows = [line for line in card.splitlines() if line.startswith(f"| {metric} |")]
    assert len(rows) == 1, (metric, rows)
    return [c.strip() for c in rows[0].strip("|").split("|")]


def test_front_matter_is_hub_yaml_with_the_base_model(tmp_path):
    meta = _front_matter(build_model_card(small_config(tmp_path), SUMMARY))
    assert meta["base_model"] == "tiny-gpt2"
    assert meta["library_name"] == "transformers"
    assert meta["tags"] == ["u2a", "unlearning", "alignment"]
    assert "license" not in meta  # unknown: omitted rather than guessed
    card = build_model_card(small_config(tmp_path), SUMMARY, license_id="apache-2.0")
    assert _front_matter(card)["license"] == "apache-2.0"
    cfg = small_config(tmp_path)
    cfg.model.name_or_path = "smollm2-135m-instruct"  # a preset: its hub id and licence
    meta = _front_matter(build_model_card(cfg, SUMMARY))
    assert (meta["base_model"], meta["license"]) == ("HuggingFaceTB/SmolLM2-135M-Instruct",
                                                     "apache-2.0")


def test_table_rows_carry_wilson_intervals_computed_by_hand(tmp_path):
    card = build_model_card(small_config(tmp_path), SUMMARY)
    for metric in ("eval/harmful_rate@harmful", "eval/harmful_rate"):
        _, before, after = _row(card, metric)
        for cell, (value, k) in ((before, (0.5, 5)), (after, (0.3, 3))):
            lo, hi = hand_wilson(k, 10)
            assert cell == f"{value:.4f} [{lo:.3f}, {hi:.3f}] ({k}/10)"
    assert _row(card, "eval/harmful_rate")[2] == "0.3000 [0.108, 0.603] (3/10)"
    # k = 0: the interval starts at 0 exactly; the metric is absent before
    lo, hi = hand_wilson(0, 4)
    assert _row(card, "eval/over_refusal@alpaca")[1:] == ["—", f"0.0000 [0.000, {hi:.3f}] (0/4)"]
    # not a rate with a count: value only
    assert _row(card, "pa/accuracy")[1:] == ["0.6000", "0.8000"]
    assert _row(card, "forget/nll")[1:] == ["2.5000", "4.0000"]
    # bookkeeping keys are not results
    for key in ("timing/eval_s", "eval/count@harmful", "eval/held_out@alpaca",
                "eval/count_harmful"):
        assert f"| {key} |" not in card


def test_method_data_held_out_and_reproduce_command(tmp_path):
    cfg = small_config(tmp_path)
    card = build_model_card(cfg, SUMMARY)
    assert "loss `npo (β = 0.2)`" in card
    assert "forget c_f = 0.5, mismatch c_m = 1" in card
    assert "Selector: **off**" in card
    assert "| forget set (unlearned) | `builtin:harmful` | completions | harmful |" in card
    assert "| evaluation (harmless) | `builtin:harmless` | prompts | alpaca |" in card
    # flags from the summary win over names: harmful is read by training, alpaca is not
    assert "- harmful (harmful): NOT held out\n" in card
    assert "- alpaca (harmless): held out\n" in card
    assert f"```bash\nu2a run --config {tmp_path / 'run'}/config.yaml\n```" in card
    assert "u2a run --config /x/run/config.yaml" in build_model_card(cfg, SUMMARY, "/x/run/")
    # without a summary the card still says what the model is, with an empty table
    empty = build_model_card(cfg, {})
    assert "No evaluation metrics were recorded" in empty and "- harmful (harmful): NOT" in empty


def test_in_run_export_path_writes_model_readme(tmp_path):
    """What job.run_rank does on rank 0: write_model_dir (trainer.export), then the card once
    the summary exists; the directory stays loadable by from_pretrained."""
    from transformers import AutoModelForCausalLM

    from u2a_dist.export import write_model_card, write_model_dir
    from u2a_dist.models import build_tiny_model, build_tiny_tokenizer

    cfg, out = small_config(tmp_path), tmp_path / "run" / "model"
    write_model_dir(build_tiny_model(0), build_tiny_tokenizer(), out)
    path = write_model_card(out, cfg, SUMMARY, tmp_path / "run")
    assert path == out / "README.md"
    assert path.read_text() == build_model_card(cfg, SUMMARY, str(tmp_path / "run"))
    AutoModelForCausalLM.from_pretrained(out)
    # an export over it (it is u2a's) replaces the card with the one it is given
    write_model_dir(build_tiny_model(0), build_tiny_tokenizer(), out, card="# other\n")
    assert (out / "README.md").read_text() == "# other\n"


def test_u2a_export_writes_the_card_from_the_runs_summary(tmp_path, monkeypatch):
    """``u2a export`` (export_checkpoint) with the ZeRO merge stubbed: no training needed."""
    import json

    pytest.importorskip("deepspeed")
    import deepspeed.utils.zero_to_fp32 as z2f

    from u2a_dist import export
    from u2a_dist.models import build_tiny_model

    cfg = small_config(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    cfg.save(run / "config.yaml")
    (run / "summary.json").write_text(json.dumps(SUMMARY))
    state = {k: v.clone() for k, v in build_tiny_model(0).state_dict().items()}
    monkeypatch.setattr(export, "_locate", lambda _: (run, run / "checkpoints", "step6"))
    monkeypatch.setattr(z2f, "get_fp32_state_dict_from_zero_checkpoint",
                        lambda *a, **k: state)
    out = export.export_checkpoint(run, tmp_path / "exported")
    card = (out / "README.md").read_text()
    assert _front_matter(card)["base_model"] == "tiny-gpt2"
    assert _row(card, "eval/harmful_rate")[2] == "0.3000 [0.108, 0.603] (3/10)"
    assert f"u2a run --config {run}/config.yaml" in card
