"""Randomly initialised presets built from a config (same family as the default model: Llama with GQA).

- `tiny`: a few-layer model over a byte-level tokenizer made in code, for unit tests (seconds, offline).
- `long-bench`: the default model's layer shapes (hidden 576, 9 heads / 3 KV heads, head dim 64) with
  only 4 layers and random weights, over the default tokenizer, so 64K-128K contexts fit in minutes on
  2 cores. Its outputs are meaningless; its speed and memory are those of the real shapes.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_tokenizer():
    """A byte-level tokenizer (one token per byte, ids 0-255, then the specials), with offsets."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(byte_alphabet))}
    for special in TINY_SPECIALS:
        vocab[special] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", bos_token="<|im_start|>",
        pad_token="<|endoftext|>", unk_token="<|endoftext|>", additional_special_tokens=TINY_SPECIALS,
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def tiny_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 3,
        initializer_range=0.2,  # the stock 0.02 makes a random model repeat one token forever
    )


def long_bench_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=131072 + 8192,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )


PRESETS = ("tiny", "long-bench")


def build_preset(name: str, seed: int, rope_scaling, apply_rope_scaling, cache_dir: Path | None):
    from transformers import LlamaForCausalLM

    if name == "tiny":
        tokenizer = byte_tokenizer()
        config = tiny_config(len(tokenizer))
    elif name == "long-bench":
        from rapid.models.default import load_default_tokenizer

        tokenizer = load_default_tokenizer(cache_dir)
        config = long_bench_config(len(tokenizer))
    else:
        raise ValueError(f"unknown preset {name!r}; choose one of {PRESETS}")
    apply_rope_scaling(config, rope_scaling)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    torch.random.set_rng_state(generator_state)
    return model, tokenizer
