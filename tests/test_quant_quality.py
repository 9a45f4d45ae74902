"""bench.quality on a tiny model: the figures are computed from the logits as documented, coarser
schemes score worse, outliers are injected where said, and bad arguments exit 2 with one line."""
import json

import pytest
import torch

from bench import quality
from rwkv_engine.checkpoint import synthetic_state_dict
from rwkv_engine.model import RWKV
from rwkv_kernels import formats


@pytest.fixture(scope="module")
def result(tmp_path_factory, tiny_pth):
    out = tmp_path_factory.mktemp("quality") / "q.json"
    assert quality.main(["--model", "rwkv-4-tiny", "--checkpoint", str(tiny_pth), "--prompt-tokens", "24",
                         "--new-tokens", "4", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_quality_rows_and_orderings(result):
    rows = result["formats"]
    assert set(rows) == {"float32", *formats.names(), "8bit-row (sim)", "4bit-block (sim)"}   # every format
    assert rows["float32"] == {"max_rel_diff": 0.0, "mean_kl": 0.0, "top1_agreement": 1.0}
    assert 0 < rows["float16"]["mean_kl"] < rows["bfloat16"]["mean_kl"] < rows["int8"]["mean_kl"]
    assert rows["int8"]["mean_kl"] < rows["4bit-block (sim)"]["mean_kl"]
    assert result["prompt_tokens"] == 24 and result["new_tokens"] == 4


def test_compare_figures_are_the_documented_ones():
    ref = torch.tensor([[0.0, 1.0, 2.0], [2.0, 0.0, 0.0]])
    other = torch.tensor([[0.0, 1.0, 3.0], [0.0, 2.0, 0.0]])
    r = quality.compare(ref, other, torch.tensor([2, 0]))
    p, q = torch.softmax(ref.double(), -1), torch.softmax(other.double(), -1)
    assert r["max_rel_diff"] == pytest.approx(2 / float(ref.std()))
    assert r["mean_kl"] == pytest.approx(float((p * (p / q).log()).sum(-1).mean()))
    assert r["top1_agreement"] == 0.5
    assert r["perplexity"] == pytest.approx(float(torch.exp(-(q[0, 2].log() + q[1, 0].log()) / 2)))


def test_outliers_are_injected_without_changing_the_float_model(tiny_cfg):
    plain, odd = synthetic_state_dict(tiny_cfg), quality.outlier_state_dict(tiny_cfg, tails=False)
    gain = odd["blocks.0.ln1.weight"] / plain["blocks.0.ln1.weight"]
    channels = (gain == 16).nonzero()[:, 0]
    assert len(channels) == 4 and int((gain == 1).sum()) == tiny_cfg.n_embd - 4
    col = odd["blocks.0.att.key.weight"] / plain["blocks.0.att.key.weight"]
    assert torch.allclose(col[:, channels], torch.full((tiny_cfg.n_embd, 4), 1 / 16))
    rows = odd["blocks.1.att.value.weight"] / plain["blocks.1.att.value.weight"]
    assert int(((rows == 8).float().mean(1) > 0.9).sum()) == 4          # (its ln1 columns are /16 too)
    assert torch.equal(odd["blocks.0.att.time_decay"], plain["blocks.0.att.time_decay"])
    tokens = torch.randint(0, tiny_cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    ref = RWKV(tiny_cfg, plain).forward(tokens, all_logits=True)[0]
    out = RWKV(tiny_cfg, odd).forward(tokens, all_logits=True)[0]
    assert float((out - ref).abs().max() / ref.std()) < 1e-4              # the same function
    tailed = quality.outlier_state_dict(tiny_cfg)["blocks.0.ffn.key.weight"] / odd["blocks.0.ffn.key.weight"]
    assert int((tailed == 10).sum()) >= 1


def test_outlier_checkpoint_is_written_once_and_labelled_synthetic(tiny_cfg, monkeypatch, tmp_path):
    from rwkv_engine import config
    from rwkv_engine.checkpoint import read_metadata
    monkeypatch.setenv("RWKV_ENGINE_CACHE", str(tmp_path))
    monkeypatch.setitem(config.MODELS, "rwkv-4-tiny", tiny_cfg)
    path = quality.checkpoint_path("rwkv-4-tiny", None, True)
    assert path.exists() and read_metadata(path).get("synthetic") == "true"
    assert quality.checkpoint_path("rwkv-4-tiny", None, True) == path


@pytest.mark.parametrize("args, message", [
    (["--model", "nope"], "unknown model name"),
    (["--model", "rwkv-4-tiny", "--formats", "int4"], "unknown weight format"),
    (["--model", "rwkv-4-tiny", "--checkpoint", "x.pth", "--outliers"], "--outliers applies to synthetic"),
    (["--model", "rwkv-4-tiny", "--checkpoint", "/nonexistent.pth"], "no such file"),
])
def test_bad_arguments_exit_2_with_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        quality.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0]
