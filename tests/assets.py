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
