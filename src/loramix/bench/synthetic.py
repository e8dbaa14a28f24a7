"""Stand-ins for real models where weights cannot travel or need not be real: a byte-level BPE tokenizer trained
on a few texts (the tests' tiny models, the GPU benchmark's Llama-2-7b-shaped one)."""

from __future__ import annotations

from collections.abc import Iterable


def byte_level_tokenizer(texts: Iterable[str], vocab_size: int, special_tokens: list[str], **named_tokens: str):
    """A PreTrainedTokenizerFast with a byte-level BPE learned from `texts` (every byte encodable); the special
    tokens take the first ids in order, and `named_tokens` (eos_token="<eos>", ...) name their roles."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **named_tokens)
