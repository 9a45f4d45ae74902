"""Per-stream text bookkeeping: incremental detokenization, stop strings, and what is safe to emit.

Text is decoded in pieces (byte-level BPE: the pieces of complete UTF-8 sequences concatenate to the
decoding of the whole), so each token costs one short decode whatever the length of the stream.
Text that could still turn into a stop string is held back until it cannot.
"""


class TextTracker:
    """Feed generated token ids one at a time; read back the text deltas to send."""

    MAX_PENDING = 8            # give up waiting for a UTF-8 sequence to complete after this many tokens

    def __init__(self, tokenizer, stop=()):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.text, self.sent = "", 0
        self.stopped = False          # a stop string was found (and cut off)
        self._pending = []

    def add(self, token):
        """Append one generated token; returns True when a stop string ended the text."""
        if self.tokenizer is None or self.stopped:
            return self.stopped
        self._pending.append(token)
        piece = self.tokenizer.decode(self._pending)
        if piece.endswith("\ufffd") and len(self._pending) < self.MAX_PENDING:
            return False                      # an incomplete UTF-8 sequence: wait for more bytes
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        self.text += piece
        self._pending = []
        cuts = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if cuts:
            self.text, self.stopped = self.text[:min(cuts)], True
        return self.stopped

    def delta(self, final=False):
        """The text not sent yet, minus a tail that could be the start of a stop string."""
        end = len(self.text) if final or self.stopped else len(self.text) - self._held_back()
        out = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return out

    def _held_back(self):
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:n]):
                    longest = n
                    break
        return longest
