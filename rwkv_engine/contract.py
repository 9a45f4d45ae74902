"""What every model behind the shared generation loop and the benchmark provides (the RWKV engine, the
transformer baselines, the paper-protocol wrapper), and the input rules they all apply.

    Model           the contract as a typing.Protocol: forward, new_state, generate, stream, ...
    as_token_batch  what forward accepts -> LongTensor [B, T] (one rule for every model)
    prompt_to_ids   what generate/stream accept (text or token ids) -> LongTensor [B, T]
    as_dtype        weight dtype names -> torch.dtype
"""
from typing import Iterator, Optional, Protocol, Tuple, runtime_checkable

import torch

from .config import DEVICE_TYPES

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}

# Token ids may come in any integer dtype; bool and floating point are refused (never truncated).
TOKEN_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)

PROMPT_KINDS = "a str, a list of equally long str, or token ids (list of ints, integer tensor [T] or [B, T])"


@runtime_checkable
class Model(Protocol):
    """The model contract. `forward` updates `state` in place and returns it; `new_state(B, max_len)`
    gives a fresh recurrent state or KV cache; `tokenizer` is None for models without one."""
    vocab_size: int
    device: torch.device
    tokenizer: Optional[object]

    def new_state(self, batch_size: int = 1, max_len: Optional[int] = None): ...

    def forward(self, tokens, state=None, all_logits: bool = False) -> Tuple[torch.Tensor, object]: ...

    def generate(self, prompt, max_new_tokens: int = 64, **kwargs): ...

    def stream(self, prompt, max_new_tokens: int = 64, **kwargs) -> Iterator: ...

    def __repr__(self) -> str: ...


def as_dtype(dtype):
    """'float32' | 'fp16' | 'bf16' | ... | a torch dtype among those -> torch.dtype."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}: use one of float32, float16, bfloat16")
    return DTYPES[dtype]


def as_token_batch(tokens, vocab_size, device=None):
    """What model.forward accepts -> LongTensor [B, T] on `device`, validated (one-line errors).

    Accepted: a list of ints or of equally long lists of ints, or an integer tensor/array [T] or [B, T]
    (any integer dtype). Refused: floats (even 2.0), bools, empty inputs, ids outside [0, vocab_size)."""
    ids = _as_int_tensor(tokens, "tokens")
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"tokens must have shape [B, T] with B, T >= 1, got {list(ids.shape)} ([T] is one stream)")
    if bool(((ids < 0) | (ids >= vocab_size)).any()):                    # one device sync
        check_token_ids(ids, vocab_size)
    return ids.to(device if device is not None else ids.device, torch.long)


def check_token_ids(ids, vocab_size):
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"token id {bad} out of range [0, {vocab_size})")


def _as_int_tensor(tokens, what):
    if isinstance(tokens, torch.Tensor):
        ids = tokens
    elif isinstance(tokens, (list, tuple)) or hasattr(tokens, "__array__"):
        if isinstance(tokens, (list, tuple)) and len(tokens) == 0:
            return torch.zeros(0, dtype=torch.long)                     # refused by the shape rule
        try:
            ids = torch.as_tensor(tokens)
        except (TypeError, ValueError, RuntimeError, OverflowError) as e:
            raise ValueError(f"{what} must be a LongTensor [B, T] or a list of ints in equally long rows "
                             f"({str(e).splitlines()[0]})") from None
    else:
        raise ValueError(f"{what} must be a LongTensor [B, T] or a list of ints, got {type(tokens).__name__}")
    if ids.dtype not in TOKEN_DTYPES:
        raise ValueError(f"{what} must be a LongTensor [B, T] or a list of ints (any integer dtype), got dtype "
                         f"{ids.dtype}: floats and bools are refused, never truncated")
    if ids.device.type not in DEVICE_TYPES:             # e.g. meta: holds no values to read
        raise ValueError(f"{what}: unsupported device {str(ids.device)!r}: use cpu or cuda")
    return ids


def prompt_to_ids(prompt, tokenizer, vocab_size):
    """A prompt (see PROMPT_KINDS) -> LongTensor [B, T], validated like `as_token_batch`."""
    if isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt
                                   and all(isinstance(p, str) for p in prompt)):
        return _encode_texts([prompt] if isinstance(prompt, str) else list(prompt), tokenizer)
    if isinstance(prompt, (bytes, bytearray, memoryview)) or (
            isinstance(prompt, (list, tuple)) and any(isinstance(p, (str, bytes, bytearray)) for p in prompt)):
        raise ValueError(f"prompt must be {PROMPT_KINDS}; got {_describe(prompt)}")
    if not isinstance(prompt, (list, tuple, torch.Tensor)) and not hasattr(prompt, "__array__"):
        raise ValueError(f"prompt must be {PROMPT_KINDS}; got {type(prompt).__name__}")
    ids = _as_int_tensor(prompt, "prompt")
    if ids.numel() == 0:
        raise ValueError("empty prompt: give at least one token")
    return as_token_batch(ids, vocab_size)


def _encode_texts(texts, tokenizer):
    if tokenizer is None:
        raise ValueError("prompt is text but this model has no tokenizer: pass token ids instead")
    for t in texts:
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"prompt text is not valid Unicode ({e.reason} at index {e.start}: "
                             f"{t[e.start:e.end]!r}); give well-formed str text") from None
    rows = [tokenizer.encode(t) for t in texts]
    if len({len(r) for r in rows}) > 1:
        raise ValueError(f"prompts tokenize to different lengths {[len(r) for r in rows]}: "
                         "batch prompts must be equally long")
    if any(len(r) == 0 for r in rows):
        raise ValueError("empty prompt: give at least one token")
    return torch.tensor(rows, dtype=torch.long)


def _describe(prompt):
    if isinstance(prompt, (list, tuple)):
        return f"a {type(prompt).__name__} of {sorted({type(p).__name__ for p in prompt})}"
    return type(prompt).__name__
