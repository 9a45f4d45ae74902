"""Streaming text: incremental decoding (bounded work per token), stop strings that never take back
streamed text, and tokens that agree with text (rwkv_engine.generation.TextStream)."""
import pytest
import torch

import rwkv_engine
from rwkv_engine.generation import IncrementalDecoder, TextStream, generate, stream


class ByteTokenizer:
    """A byte-level tokenizer: id i < 256 is byte i, id 256 + j is the two bytes PAIRS[j].
    Counts how many ids it decodes in total (the work of streaming)."""
    PAIRS = [b"ST", b"OP", "é".encode(), b"\xe2\x82", b"\xac!"]

    def __init__(self):
        self.decoded_ids = 0
        self.vocab_size = 256 + len(self.PAIRS)

    def bytes_of(self, ids):
        return b"".join(bytes([i]) if i < 256 else self.PAIRS[i - 256] for i in ids)

    def decode(self, ids):
        self.decoded_ids += len(ids)
        return self.bytes_of(ids).decode("utf-8", errors="replace")

    def encode(self, text):
        return list(text.encode())


def ids_of(text):
    return list(text.encode())


def run(tok, ids, stop_strings=()):
    ts = TextStream(tok, stop_strings)
    pieces = []
    for i in ids:
        pieces.append(ts.push(i))
        if ts.stopped:
            break
    pieces.append(ts.finish())
    return ts, pieces


@pytest.mark.parametrize("text", ["hello world", "héllo €uro ✓ 𝄞 done", "€€€", "a\U0001F600b"])
def test_streamed_pieces_join_to_the_full_decode(text):
    tok = ByteTokenizer()
    ts, pieces = run(tok, ids_of(text))
    assert "".join(pieces) == ts.text == text
    assert all("\ufffd" not in p for p in pieces)             # never half a character


def test_incomplete_character_is_held_until_complete():
    tok = ByteTokenizer()
    ts = TextStream(tok)
    assert ts.push(ord("a")) == "a"
    assert ts.push(256 + 3) == ""                              # e2 82: the start of "€"
    assert ts.push(256 + 4) == "€!"                            # ac !: completes it


def test_invalid_bytes_and_a_long_run_of_lead_bytes():
    tok = ByteTokenizer()
    ids = [0xF0] * 50 + ids_of("ok") + [0xFF, 0x80] + ids_of("x") + [0xE2]
    ts, pieces = run(tok, ids)
    assert ts.text == "".join(pieces) == tok.bytes_of(ids).decode("utf-8", errors="replace")


def test_decoding_work_per_token_is_bounded():
    """The old loop decoded every token again at each step: n(n+1)/2 ids for n tokens."""
    for ids in (ids_of("abc" * 700), [0xF0] * 2000, ids_of("€" * 700)):
        tok = ByteTokenizer()
        run(tok, ids)
        assert tok.decoded_ids <= 40 * len(ids), tok.decoded_ids    # O(n); the old loop: ~n^2 / 2


def test_incremental_decoder_bounded_even_with_a_stop_string_pending():
    tok = ByteTokenizer()
    ids = ids_of("ab" * 1000)
    run(tok, ids, stop_strings=["abX"])
    assert tok.decoded_ids <= 40 * len(ids)


def test_stop_string_across_tokens_never_retracts_streamed_text():
    """'Hello' streamed, then the final text 'Hel' (stop string 'loX' split over tokens) was the bug."""
    tok = ByteTokenizer()
    ts, pieces = run(tok, ids_of("Hello there"), stop_strings=["lo th"])
    assert ts.stopped and ts.text == "Hel"
    streamed = ""
    for p in pieces:
        streamed += p
        assert ts.text.startswith(streamed)                    # nothing emitted is taken back
    assert streamed == ts.text


def test_held_back_tail_is_released_when_it_cannot_start_a_stop_string():
    tok = ByteTokenizer()
    ts = TextStream(tok, ["STOP"])
    assert [ts.push(i) for i in ids_of("abS")] == ["a", "b", ""]
    assert ts.push(ord("T")) == ""
    assert ts.push(ord("x")) == "STx"                          # "STx" cannot become "STOP"
    assert ts.finish() == "" and ts.text == "abSTx"


def test_tokens_and_text_agree_at_a_stop_string():
    """Rule: keep the tokens whose text starts before the stop string."""
    tok = ByteTokenizer()
    ST, OP = 256, 257
    # stop string at a token boundary: its tokens are dropped, decode(tokens) == text
    ts, _ = run(tok, ids_of("ab") + [ST, OP] + ids_of("cd"), ["STOP"])
    assert ts.text == "ab" and ts.tokens == ids_of("ab") and tok.decode(ts.tokens) == ts.text
    # stop string starting inside a token ("xST" with stop "TOP"): that token stays, text is cut in it
    ts, _ = run(tok, ids_of("x") + [ST, OP], ["TOP"])
    assert ts.text == "xS" and ts.tokens == [ord("x"), ST]
    assert tok.decode(ts.tokens).startswith(ts.text)


def test_finish_releases_a_partial_stop_string_and_an_incomplete_character():
    tok = ByteTokenizer()
    ts = TextStream(tok, ["STOP"])
    for i in ids_of("aST") + [0xE2]:
        ts.push(i)
    assert ts.text == "a"
    assert ts.finish() == "ST\ufffd" and ts.text == "aST\ufffd"


@pytest.mark.parametrize("bad", ["", [""], ["ok", ""], [b"x"], [None]])
def test_empty_or_non_str_stop_strings_are_rejected(bad):
    with pytest.raises(ValueError, match="stop strings must be non-empty str"):
        TextStream(ByteTokenizer(), bad)


# ---------------------------------------------------------------------------------------------
# Through the generation loop on the real tokenizer

@pytest.fixture(scope="module")
def model():
    return rwkv_engine.load("rwkv-4-tiny")


def test_stop_string_in_the_loop_streams_only_final_text(model):
    free = generate(model, [5], max_new_tokens=24, temperature=0)
    text = free.text[0]
    needle = text[len(text) // 2: len(text) // 2 + 4]
    pieces = [step.text[0] for step in stream(model, [5], max_new_tokens=24, temperature=0, stop_strings=[needle])]
    res = generate(model, [5], max_new_tokens=24, temperature=0, stop_strings=[needle])
    assert "".join(pieces) == res.text[0] == text[:text.find(needle)]
    assert rwkv_engine.tokenizer().decode(res.tokens[0]).startswith(res.text[0])
    assert res.tokens[0] == free.tokens[0][:len(res.tokens[0])]


def test_empty_stop_string_is_rejected_by_generate(model):
    with pytest.raises(ValueError, match="stop strings must be non-empty str"):
        generate(model, [5], max_new_tokens=3, stop_strings=[""])
    with pytest.raises(ValueError, match="stop strings must be non-empty str"):
        stream(model, [5], max_new_tokens=3, stop_strings="")


def test_streaming_decodes_a_bounded_number_of_ids_per_step(model):
    """With a counting tokenizer around the real one, 200 steps decode O(200) ids, not ~20,000."""
    real = rwkv_engine.tokenizer()

    class Counting:
        decoded = 0

        def encode(self, text):
            return real.encode(text)

        def decode(self, ids):
            Counting.decoded += len(ids)
            return real.decode(ids)

    class WithCountingTokenizer:
        def __init__(self, m):
            self.m, self.tokenizer = m, Counting()
            self.vocab_size, self.device = m.vocab_size, m.device

        def new_state(self, *a, **k):
            return self.m.new_state(*a, **k)

        def forward(self, *a, **k):
            return self.m.forward(*a, **k)

    n = 200
    steps = list(stream(WithCountingTokenizer(model), [5], max_new_tokens=n, seed=0))
    assert len(steps) == n
    assert Counting.decoded <= 40 * n, Counting.decoded
