"""The GPT-NeoX-20B tokenizer (RWKV-4-Pile and Pythia), shipped with the package."""
from functools import lru_cache
from importlib import resources

from tokenizers import Tokenizer as _HFTokenizer

NEOX_VOCAB_SIZE = 50277     # ids of the GPT-NeoX-20B tokenizer: the vocabulary of every RWKV-4-Pile model


class Tokenizer:
    """encode(str) -> list[int], decode(list[int]) -> str over a `tokenizers` tokenizer.json."""

    def __init__(self, path):
        self.path = str(path)
        self._tok = _HFTokenizer.from_file(self.path)

    @property
    def vocab_size(self):
        return self._tok.get_vocab_size()

    @property
    def eos_id(self):
        """The id of <|endoftext|> (None when the vocabulary has none): where a text ends."""
        return self._tok.token_to_id("<|endoftext|>")

    def encode(self, text):
        if not isinstance(text, str):
            raise ValueError(f"encode takes a str, got {type(text).__name__}")
        return self._tok.encode(text).ids

    def encode_releasing_gil(self, text):
        """encode(text), letting other threads run meanwhile (a server's event loop while a worker
        thread tokenizes a long prompt): tokenizers' encode holds the GIL, encode_batch does not."""
        if not isinstance(text, str):
            raise ValueError(f"encode takes a str, got {type(text).__name__}")
        return self._tok.encode_batch([text])[0].ids

    def decode(self, ids):
        return self._tok.decode(list(ids), skip_special_tokens=False)


@lru_cache(maxsize=None)
def tokenizer():
    """The GPT-NeoX-20B tokenizer: NEOX_VOCAB_SIZE ids, <|endoftext|> = 0."""
    return Tokenizer(resources.files("rwkv_engine") / "data" / "20B_tokenizer.json")
