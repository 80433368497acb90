"""Tiny, random, on-disk models for tests: built from a config, never downloaded."""

from __future__ import annotations

from pathlib import Path

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
CORPUS = [
    "Action: Operation\n```sql\nSELECT * FROM `table` WHERE x = 'y';\n```",
    'Action: Answer\nFinal Answer: ["done", 1.0]',
    "INSERT INTO t (a, b) VALUES ('x', 2); UPDATE t SET a = 'z' WHERE b > 1;",
    "user model The name of this table is Results, and the headers are Name, Year.",
    "Error: no such column. Query OK, 0 rows affected. [('Women +60kg Bronze',)]",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 ()[]{}<>,.;:'\"`!?#*/-+=_",
]


def build_tiny_model(out_dir: Path, vocab_size: int = 320, seed: int = 0, head_dim: int = 32) -> Path:
    """Saves a 2-layer random Gemma 3 model and a small byte-level BPE tokenizer to ``out_dir``.

    ``head_dim`` 32: the smallest vLLM's CPU attention runs, so both backends serve this model."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    )
    tokenizer.save_pretrained(out_dir)

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=head_dim,
        max_position_embeddings=8192,  # a context as long as the run's (vLLM refuses longer prompts)
        sliding_window=16,  # short, so test prompts cross it
        layer_types=["sliding_attention", "full_attention"],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")],
    )
    model = Gemma3ForCausalLM(config)
    model.save_pretrained(out_dir)
    return out_dir


def check_min_p(policy, model) -> None:
    """``policy`` (either backend) draws, under min_p 0.5, only next tokens at least about half as likely
    as ``model``'s likeliest, and without it draws others too. The tiny random model is flat, so the
    draw is at temperature 0.1, which sharpens it."""
    import torch

    from agentloop.policy.base import SamplingConfig

    prompt = policy.chat.user_segment("bb cc", first=True)
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].float()
    probs = (logits / 0.1).softmax(-1)
    near = set((probs >= 0.45 * probs.max()).nonzero().squeeze(1).tolist())  # 0.5, with room for rounding

    def first_tokens(min_p: float) -> set[int]:
        sampling = SamplingConfig(max_new_tokens=1, temperature=0.1, min_p=min_p, seed=1)
        return {g.token_ids[0] for g in policy.generate([prompt] * 32, sampling)}

    assert not first_tokens(0.0) <= near  # the whole vocabulary: far tokens are drawn too
    assert first_tokens(0.5) <= near
