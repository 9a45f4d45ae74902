"""Issue 19's loader and forward cases: declared sizes are checked against the storage behind them and
against sane dimensions before any value is read (20), a config.json that contradicts its weights is
an error (21), meta tensors get the device message (22), one forward per state at a time (23), long
prompts run in bounded memory (26), and a state prints on one line (9)."""
import json
import struct
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import baselines
import rwkv_engine
from rwkv_engine import model as model_module
from rwkv_engine.checkpoint import read_checkpoint, synthetic_state_dict, write_hf
from rwkv_engine.config import RWKVConfig
from rwkv_engine.files import CheckpointError
from rwkv_engine.state import State, StateInUseError
from helpers import one_line_error


@pytest.fixture(scope="module")
def sd(tiny_pth):
    return torch.load(tiny_pth, weights_only=True)


def saved(sd, path, **replace):
    torch.save(dict(sd, **replace), path)
    return path


# ---------------------------------------------------------------------------------------------
# 20. Declared sizes against the storage behind them, and against sane dimensions

def test_a_stride_0_view_declaring_a_trillion_values_is_refused_before_any_value_is_read(sd, tmp_path):
    """The attack: a tiny file whose emb.weight declares 1e6 x 1e6 values over one float (torch.save
    keeps the view: the storage and the strides). The value check used to reduce all 1e12 of them."""
    huge = torch.zeros(1).expand(10**6, 10**6)
    path = saved(sd, tmp_path / "dos.pth", **{"emb.weight": huge})
    assert path.stat().st_size < 2 * 1024 * 1024
    err = one_line_error(CheckpointError, lambda: rwkv_engine.load(str(path)),
                         r"key 'emb\.weight' declares shape \[1000000, 1000000\] with strides \[0, 0\] .*over a storage of 4 bytes")
    assert str(path) in str(err)


@pytest.mark.parametrize("view", [
    lambda t: t[:1].expand_as(t),                                       # one row repeated
    lambda t: torch.as_strided(t.flatten()[:t.shape[0] + t.shape[1]].clone(), t.shape, (1, 1)),  # overlapping rows
])
def test_a_view_that_repeats_values_is_refused_not_loaded(sd, tmp_path, view):
    """Sane shapes, but far more values declared than stored: not a checkpoint tensor (it loaded)."""
    path = saved(sd, tmp_path / "view.pth", **{"head.weight": view(sd["head.weight"])})
    one_line_error(CheckpointError, lambda: rwkv_engine.load(str(path)), r"key 'head\.weight' declares shape \[1000, 96\]")


def test_a_view_of_a_larger_storage_still_loads(sd, tmp_path):
    """A slice of a bigger tensor (torch.save keeps the whole storage) declares fewer values than stored."""
    big = torch.cat([sd["head.weight"], sd["head.weight"]])
    path = saved(sd, tmp_path / "slice.pth", **{"head.weight": big[1000:]})
    assert torch.load(path, weights_only=True)["head.weight"].untyped_storage().nbytes() == big.nbytes
    rwkv_engine.load(str(path))


def test_a_safetensors_header_declaring_more_than_its_bytes_is_refused(tmp_path):
    """safetensors checks every tensor's declared size against its data offsets and the file at open."""
    header = json.dumps({"emb.weight": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 16]}}).encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "dos.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    one_line_error(CheckpointError, lambda: rwkv_engine.load(str(path)), r"dos\.safetensors: truncated or not a safetensors file")


def test_a_layer_index_far_beyond_any_model_is_refused_before_the_layout_is_built(sd, tmp_path):
    """blocks.100000000.* once made the loader list the expected keys of 1e8 layers (hours, or out of memory)."""
    path = saved(sd, tmp_path / "layers.pth", **{"blocks.100000000.ln1.weight": torch.ones(96)})
    one_line_error(CheckpointError, lambda: rwkv_engine.load(str(path)), r"layers\.pth: n_layer 100000001 is above 1024")


def test_an_embedding_width_far_beyond_any_model_is_refused(sd, tmp_path):
    path = saved(sd, tmp_path / "wide.pth", **{"emb.weight": torch.zeros(1, 1 << 17)})
    one_line_error(CheckpointError, lambda: rwkv_engine.load(str(path)), r"wide\.pth: n_embd 131072 is above 65536")


def tiny_pythia(tmp_path, name="p"):
    from baselines.config import GPTNeoXConfig
    return baselines.write_synthetic(GPTNeoXConfig(1, 32, 2, 64, ffn_dim=32, name=name), tmp_path / name, dtype="float32")


def test_a_baseline_config_with_absurd_dimensions_is_refused_before_listing_its_tensors(tmp_path):
    path = tiny_pythia(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_hidden_layers"] = 10**9           # shapes() once listed 6e9 tensors
    (path / "config.json").write_text(json.dumps(cfg))
    one_line_error(CheckpointError, lambda: baselines.load(str(path)), r"config\.json: config n_layer 1000000000 is above 1024")


def test_a_baseline_bin_with_a_repeating_view_is_refused(tmp_path):
    path = tiny_pythia(tmp_path)
    w = load_file(path / "model.safetensors")
    w["gpt_neox.embed_in.weight"] = w["gpt_neox.embed_in.weight"][:1].expand(64, 32)
    torch.save(w, path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    one_line_error(CheckpointError, lambda: baselines.load(str(path)),
                   r"pytorch_model\.bin: key 'gpt_neox\.embed_in\.weight' declares shape \[64, 32\]")


# ---------------------------------------------------------------------------------------------
# 21. A Hugging Face directory whose config.json contradicts its weights

@pytest.fixture
def hf_dir(tiny_pth, sd, tmp_path):
    _, cfg = read_checkpoint(tiny_pth)
    return write_hf(sd, cfg, tmp_path / "hf")


@pytest.mark.parametrize("key, value, message", [
    ("hidden_size", 768, r"hidden_size is 768 but the weights have n_embd 96"),
    ("attention_hidden_size", 64, r"attention_hidden_size is 64 but the weights have n_embd 96"),
    ("num_hidden_layers", 12, r"num_hidden_layers is 12 but the weights have n_layer 3"),
    ("num_hidden_layers", 2, r"num_hidden_layers is 2 but the weights have n_layer 3"),
    ("vocab_size", 50277, r"vocab_size is 50277 but the weights have vocab_size 1000"),
    ("intermediate_size", 999, r"intermediate_size is 999 but the weights have ffn_dim 384"),
    ("hidden_size", "96", r"hidden_size must be an int, got '96'"),
])
def test_a_config_json_contradicting_the_weights_is_an_error_naming_both(hf_dir, key, value, message):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg[key] = value
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    err = one_line_error(CheckpointError, lambda: rwkv_engine.load(str(hf_dir)), message)
    assert "config.json" in str(err)


def test_a_config_json_leaving_derived_sizes_null_loads(hf_dir):
    """HF derives a null intermediate_size / attention_hidden_size from hidden_size: nothing is contradicted."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.update(intermediate_size=None, attention_hidden_size=None)
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    assert rwkv_engine.load(str(hf_dir)).config.ffn_dim == 384


@pytest.mark.parametrize("key, value, message", [
    ("hidden_size", 64, r"has shape \[64, 32\], expected \[64, 64\] \(from config\.json\)"),
    ("vocab_size", 1000, r"weight' has shape \[64, 32\], expected \[1000, 32\] \(from config\.json\)"),
    ("intermediate_size", 999, r"mlp\.dense_\S+' has shape \[32(, 32)?\], expected \[(999|32, 999)(, 32)?\] \(from config\.json\)"),
    ("num_hidden_layers", 12, r"missing key 'gpt_neox\.layers\.1\..*\(config\.json implies it\)"),
])
def test_a_baseline_config_json_contradicting_the_weights_is_an_error_naming_both(tmp_path, key, value, message):
    """The baselines' loader checks every tensor against the shapes config.json implies."""
    path = tiny_pythia(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))
    one_line_error(CheckpointError, lambda: baselines.load(str(path)), message)


# ---------------------------------------------------------------------------------------------
# 22. Meta tensors: the device message load(device=...) gives

def test_a_meta_tensor_in_a_pth_gets_the_device_message(sd, tmp_path):
    path = saved(sd, tmp_path / "meta.pth", **{"head.weight": torch.empty(1000, 96, device="meta")})
    one_line_error(CheckpointError, lambda: rwkv_engine.load(str(path)),
                   r"meta\.pth: key 'head\.weight': unsupported device 'meta': use cpu or cuda")
    one_line_error(ValueError, lambda: rwkv_engine.load(str(path), device="meta"), r"^unsupported device 'meta': use cpu or cuda$")


def test_meta_tokens_get_the_device_message(tiny_model, tmp_path):
    tokens = torch.zeros(1, 3, dtype=torch.long, device="meta")
    one_line_error(ValueError, lambda: tiny_model.forward(tokens), r"^tokens: unsupported device 'meta': use cpu or cuda$")
    one_line_error(ValueError, lambda: tiny_model.generate(tokens, max_new_tokens=1),
                   r"^prompt: unsupported device 'meta': use cpu or cuda$")
    pythia = baselines.load(str(tiny_pythia(tmp_path)))
    one_line_error(ValueError, lambda: pythia.forward(tokens), r"^tokens: unsupported device 'meta'")


# ---------------------------------------------------------------------------------------------
# 23. One forward per state at a time

@pytest.mark.parametrize("prompt", [[4], [4, 5, 6]], ids=["token-mode", "sequence-mode"])
def test_a_state_in_use_by_another_forward_is_refused(tiny_model, monkeypatch, prompt):
    """Thread 1's forward is held inside the model (its state claimed) until thread 2 has tried the
    same state: thread 2 is refused at once, a fresh state runs, and thread 1's logits are the serial ones."""
    entered, leave = threading.Event(), threading.Event()
    run_blocks = tiny_model.run_blocks

    def held(x, state):
        if threading.current_thread() is not threading.main_thread():
            entered.set()
            leave.wait(10)
        return run_blocks(x, state)
    state, first = tiny_model.new_state(), {}
    expected, _ = tiny_model.forward([1, 2, 3])
    monkeypatch.setattr(tiny_model, "run_blocks", held)
    worker = threading.Thread(target=lambda: first.update(out=tiny_model.forward([1, 2, 3], state)))
    worker.start()
    try:
        assert entered.wait(10)
        one_line_error(StateInUseError, lambda: tiny_model.forward(prompt, state),
                       r"^state State\(1 stream, 3 layers.*in use by a forward\) is already being updated by another "
                       r"forward: one forward per state at a time")
        tiny_model.forward(prompt, tiny_model.new_state())
    finally:
        leave.set()
        worker.join(10)
    assert not worker.is_alive()
    assert torch.equal(first["out"][0], expected)
    tiny_model.forward(prompt, state)              # free again once the first forward returned


def test_a_forward_that_fails_frees_its_state(tiny_model, monkeypatch):
    def broken(x, state):
        raise RuntimeError("kernel failed")
    state = tiny_model.new_state()
    monkeypatch.setattr(tiny_model, "run_blocks", broken)
    with pytest.raises(RuntimeError, match="kernel failed"):
        tiny_model.forward([1, 2], state)
    monkeypatch.undo()
    tiny_model.forward([1, 2], state)


# ---------------------------------------------------------------------------------------------
# 26. A long prompt runs in chunks: memory does not grow with it, logits as one call gives them

class LargestTensor(TorchDispatchMode):
    """The largest storage any torch op creates or returns inside the block (every intermediate)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.bytes = max(self.bytes, t.untyped_storage().nbytes())
        return out


@pytest.fixture(scope="module")
def small_model():
    cfg = RWKVConfig(n_layer=1, n_embd=32, vocab_size=50)
    return model_module.RWKV(cfg, synthetic_state_dict(cfg, seed=3))


def test_a_long_forward_works_in_memory_that_does_not_grow_with_the_prompt(small_model, monkeypatch):
    monkeypatch.setattr(model_module, "SEQUENCE_CHUNK", 32, raising=False)       # 64 rows: still GEMMs
    largest = {}
    for T in (64, 512):
        tokens = torch.randint(0, 50, (2, T), generator=torch.Generator().manual_seed(T))
        with LargestTensor() as mode:
            small_model.forward(tokens)
        largest[T] = mode.bytes
    assert largest[512] == largest[64]
    assert largest[512] <= 2 * 32 * small_model.config.ffn_dim * 4       # one chunk's [B, T, ffn_dim] float32


def test_chunked_logits_and_state_match_explicit_chunks_exactly_and_one_call_closely(tiny_model, monkeypatch):
    """Internal chunks are the same computation as feeding the chunks by hand: bit-identical. Against
    one call over the whole prompt they differ at most by GEMM blocking over rows (on this project's
    CPUs, MKL, they are bit-identical); the tolerance below is 1e-5, float32 rounding of O(1) logits."""
    tokens = torch.randint(0, 1000, (1, 300), generator=torch.Generator().manual_seed(0))
    whole, whole_state = tiny_model.forward(tokens, all_logits=True)
    monkeypatch.setattr(model_module, "SEQUENCE_CHUNK", 64)
    spans = model_module.sequence_chunks(300)
    assert [b - a for a, b in spans] == [60] * 5
    chunked, state = tiny_model.forward(tokens, all_logits=True)
    last, _ = tiny_model.forward(tokens)
    by_hand, hand_state = [], tiny_model.new_state()
    for a, b in spans:
        before_last = hand_state.clone()
        out, hand_state = tiny_model.forward(tokens[:, a:b], hand_state, all_logits=True)
        by_hand.append(out)
    by_hand = torch.cat(by_hand, dim=1)
    assert chunked.shape == (1, 300, 1000)
    assert torch.equal(chunked, by_hand)
    assert all(torch.equal(x, y) for x, y in zip(state.tensors().values(), hand_state.tensors().values()))
    assert torch.equal(last, tiny_model.forward(tokens[:, spans[-1][0]:], before_last)[0])
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    for x, y in zip(state.tensors().values(), whole_state.tensors().values()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_chunks_are_near_equal_and_never_leave_a_short_tail():
    assert model_module.sequence_chunks(4096, 4096) == [(0, 4096)]
    assert model_module.sequence_chunks(4097, 4096) == [(0, 2048), (2048, 4097)]
    spans = model_module.sequence_chunks(20000, 4096)
    assert [b - a for a, b in spans] == [4000] * 5
    assert model_module.sequence_chunks(3, 64) == [(0, 3)]


# ---------------------------------------------------------------------------------------------
# 9 (part). print(state): one line

def test_a_state_prints_on_one_line_without_its_tensors(tiny_model, small_model):
    text = repr(tiny_model.new_state(2))
    assert text == "State(2 streams, 3 layers, n_embd 96, float32 token shift, float32 wkv, cpu, 0.01 MiB)"
    assert str(tiny_model.new_state(2)) == text
    half = model_module.RWKV(small_model.config, synthetic_state_dict(small_model.config), dtype="bfloat16")
    assert repr(half.new_state()) == "State(1 stream, 1 layers, n_embd 32, bfloat16 token shift, float32 wkv, cpu, 0.00 MiB)"
    malformed = State(att_x=None, att_a=None, att_b=None, att_p=None, ffn_x=None)
    assert repr(malformed) == "State(malformed: att_x is a NoneType)"
