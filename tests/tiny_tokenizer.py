"""A byte-level tokenizer built in code, for tests with tiny random models (no downloads).

Ids 0..255 are the raw bytes, then `<s>`=256 (bos), `</s>`=257 (eos), `<pad>`=258: vocab size 259.
"""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
VOCAB_SIZE = 259


def make_tokenizer() -> PreTrainedTokenizerFast:
    # ByteLevel turns each byte into one character; a BPE with no merges over those 256
    # characters then gives one token per byte, with id == byte value.
    vocab = {char: byte for byte, char in enumerate(_byte_chars())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<s>", "</s>", "<pad>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def _byte_chars() -> list[str]:
    """GPT-2's byte-to-character table, the one ByteLevel uses: the character of byte b is at b."""
    printable = {*range(33, 127), *range(161, 173), *range(174, 256)}
    spare = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(spare)) for b in range(256)]
