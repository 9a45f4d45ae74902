"""A weight format is one record (rwkv_kernels/formats.py) plus its kernels: a toy format defined here, inside
the test (int8 with one float32 scale per row, served by the dequantising torch kernel), registered and
nothing else, loads with `rwkv_engine.load(weights=...)`, runs token and sequence mode, converts with
`python -m rwkv_engine.convert --weights`, and counts in the benchmark's fit check. Also: the records
agree with the C enum, and every derived table reads them."""
import dataclasses
from dataclasses import dataclass

import pytest
import torch

import rwkv_engine
from rwkv_kernels import cpu_c, dispatch, formats
from rwkv_engine.convert import main as convert_main

TOY = "q8row"


@dataclass
class RowInt8Weight(formats.PackedWeight):
    """W [out, in] ~ q * scale[:, None]: q int8 [out, in], scale float32 [out]."""
    q: torch.Tensor
    scale: torch.Tensor
    in_features: int

    def parts(self):
        return self.q, self.scale

    def dequantize(self):
        return self.q.float() * self.scale[:, None]

    def check(self, name="weight"):
        if self.q.dtype != torch.int8 or self.q.shape != (self.scale.shape[0], self.in_features):
            raise ValueError(f"{name}: {self.format} values must be int8 [out, in]")
        return self


def quantize_rows(w, after_slice=None):
    w = w.detach().float()
    scale = (w.abs().amax(1) / 127).clamp_(min=1e-8)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    if after_slice is not None:
        after_slice(w)
    return RowInt8Weight(q, scale, w.shape[1])


def toy_record():
    return formats.WeightFormat(
        TOY, None, 1.0, torch.float32, pack=quantize_rows, dequantize=RowInt8Weight.dequantize,
        reference=lambda x, w: (x.double() @ w.dequantize().double().T).float(),
        serves=(formats.Serve("cpu", "float32", "*", "quant_torch"),), packed_type=RowInt8Weight,
        file_parts=("", ".scale"))


@pytest.fixture
def toy_format():
    record = formats.register(toy_record())
    try:
        yield record
    finally:
        formats.unregister(TOY)
    assert TOY not in formats.NAMES and not any(r.weights == TOY for r in dispatch.TABLE)


def with_toy_values(model):
    """The float32 model with every matrix replaced by its toy-format values (computed here)."""
    for blk in model.blocks:
        for name in ("att_receptance", "att_key", "att_value", "att_output", "ffn_receptance", "ffn_key", "ffn_value"):
            setattr(blk, name, quantize_rows(getattr(blk, name)).dequantize())
    model.head = quantize_rows(model.head).dequantize()
    return model


def token_by_token(model, tokens):
    state = model.new_state(tokens.shape[0])
    return torch.cat([model.forward(tokens[:, t:t + 1], state)[0][:, None] for t in range(tokens.shape[1])], 1)


def test_a_registered_format_works_everywhere(toy_format, tiny_pth, tmp_path):
    tokens = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(0))
    want = with_toy_values(rwkv_engine.load(str(tiny_pth))).forward(tokens, all_logits=True)[0]
    model = rwkv_engine.load(str(tiny_pth), weights=TOY)
    assert model.weight_format == TOY and isinstance(model.blocks[0].att_key, RowInt8Weight)
    assert dispatch.choose("decode_layers", ("cpu", "float32", TOY, "contiguous")) == "composed"   # no C code
    seq = model.forward(tokens, all_logits=True)[0]
    torch.testing.assert_close(seq, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(token_by_token(model, tokens[:, :6]), want[:, :6], rtol=1e-4, atol=1e-4)

    out = tmp_path / "tiny-toy.safetensors"
    assert convert_main([str(tiny_pth), str(out), "--weights", TOY]) == 0
    from_file = rwkv_engine.load(str(out))
    assert from_file.weight_format == TOY
    assert torch.equal(from_file.forward(tokens, all_logits=True)[0], seq)

    import bench.cli
    import bench.models
    assert TOY in bench.cli.WEIGHT_FORMATS and bench.models.bytes_per_weight(weights=TOY) == 1.0
    n = bench.models.n_params("rwkv-4-tiny")
    assert bench.models.estimate("rwkv-4-tiny", 8, weights=TOY)["params_bytes"] == int(n * 1.0)
    ok, why = bench.models.fits("rwkv-4-tiny", tokens=8, weights=TOY, budget_bytes=1)
    assert not ok and "needs" in why


def test_registration_is_checked(toy_format):
    with pytest.raises(ValueError, match="'q8row' is already registered"):
        formats.register(toy_record())
    with pytest.raises(ValueError, match="C code 3 is taken"):
        formats.register(formats.WeightFormat("other", 3, 1.0, torch.float32, None, None, None,
                                              packed_type=RowInt8Weight))
    with pytest.raises(ValueError, match="unknown weight format 'int4': use one of float32, float16, bfloat16, .*q8row"):
        formats.get("int4")


def test_every_table_is_derived_from_the_records():
    import bench.cli
    import bench.models
    from rwkv_kernels import quant
    for fmt in formats.all_formats():
        assert bench.models.WEIGHT_BYTES[fmt.name] == fmt.bytes_per_weight
        assert fmt.name in bench.cli.WEIGHT_FORMATS and fmt.name in quant.FORMATS
        linear_rows = [r for r in dispatch.TABLE if r.op == "linear" and r.weights == fmt.name]
        assert [(r.device, r.compute, r.shape, r.impl, r.fallback) for r in linear_rows] == \
            [(s.device, s.compute, s.shape, s.impl, s.fallback) for s in fmt.serves]
        decode_rows = [r for r in dispatch.TABLE if r.op == "decode_layers" and r.weights == fmt.name]
        assert len(decode_rows) == (fmt.code is not None)


@pytest.mark.skipif(not cpu_c.available(), reason="no C kernels here")
def test_the_c_enum_is_checked_against_the_records():
    lib = cpu_c.ops().lib
    formats.check_c_enum(lib.format_name)                                     # agrees today
    names = {code: name for name, code in formats.c_codes().items()}
    assert lib.format_name(len(names)) is None and [lib.format_name(c).decode() for c in sorted(names)] == \
        [names[c] for c in sorted(names)]
    swapped = lambda code: {1: b"bfloat16", 2: b"float16"}.get(code, lib.format_name(code))
    with pytest.raises(RuntimeError, match="C format enum .* disagrees with the format records"):
        formats.check_c_enum(swapped)
    with pytest.raises(RuntimeError, match="disagrees"):
        formats.check_c_enum(lambda code: lib.format_name(code) if code < 3 else None)    # one missing in C
    formats.register(dataclasses.replace(toy_record(), code=len(names)))                  # a code C lacks
    try:
        with pytest.raises(RuntimeError, match="disagrees with the format records"):      # checked at load
            cpu_c.CpuOps(cpu_c.build(cpu_c.SOURCE, cpu_c.ops().isa), cpu_c.ops().isa)
    finally:
        formats.unregister(TOY)


def test_a_record_sets_where_its_sequences_leave_the_c_step_for_the_gemm_per_build(monkeypatch):
    """`short_rows` in a record: a sequence of up to its rows for the build in use is "short" (the C step,
    the decode kernels), one more row "sequence" (the GEMM); None keeps every length on the C step; an
    ISA it does not name gets SHORT_ROWS. RWKV_ENGINE_ISA picks the build, so the build's rows."""
    shape = lambda rows, name=TOY: dispatch.product_shape(torch.zeros(1, rows, 8), name)
    for isa in cpu_c.supported_isas():
        monkeypatch.setenv("RWKV_ENGINE_ISA", isa)
        rows = {"avx2": 5, "avx512": 7}
        formats.register(dataclasses.replace(toy_record(), short_rows=tuple(rows.items())))
        try:
            assert dispatch.short_rows(TOY) == rows[isa]
            assert shape(rows[isa]) == "short" and shape(rows[isa] + 1) == "sequence"
            assert dispatch.product_shape(torch.zeros(3, 8), TOY) == "token"
            with dispatch.rows_independent():
                assert shape(1000) == "short"
        finally:
            formats.unregister(TOY)
        formats.register(dataclasses.replace(toy_record(), short_rows=((isa, None),)))
        try:
            assert shape(100_000) == "short"
        finally:
            formats.unregister(TOY)
        formats.register(toy_record())                      # no rows for any build
        try:
            S = dispatch.SHORT_ROWS
            assert shape(S) == "short" and shape(S + 1) == "sequence"
        finally:
            formats.unregister(TOY)
