"""The model contract and the one input rule every model applies (rwkv_engine.contract)."""
import numpy as np
import pytest
import torch

import rwkv_engine
from rwkv_engine.contract import Model, TOKEN_DTYPES, as_dtype, as_token_batch, prompt_to_ids

V = 100


@pytest.mark.parametrize("dtype", TOKEN_DTYPES)
def test_every_integer_dtype_is_accepted_and_becomes_long(dtype):
    ids = as_token_batch(torch.tensor([[1, 2, 99]], dtype=dtype), V)
    assert ids.dtype == torch.long and ids.tolist() == [[1, 2, 99]]
    # the prompt path applies the same rule (it disagreed on int16/uint8 before)
    assert prompt_to_ids(torch.tensor([1, 2, 99], dtype=dtype), None, V).tolist() == [[1, 2, 99]]


@pytest.mark.parametrize("bad", [
    [1.5, 2.0],                                   # used to be truncated to [1, 2]
    [2.0],
    [[1, 2.0]],
    torch.tensor([1.0, 2.0]),
    torch.tensor([1.0, 2.0], dtype=torch.float16),
    [True, False],
    torch.tensor([True]),
    np.array([1.5]),
])
def test_non_integer_tokens_are_refused(bad):
    with pytest.raises(ValueError, match="floats and bools are refused"):
        as_token_batch(bad, V)
    with pytest.raises(ValueError, match="floats and bools are refused"):
        prompt_to_ids(bad, None, V)


@pytest.mark.parametrize("bad, message", [
    ([[1, 2], [3]], "equally long rows"),
    ("12", "a LongTensor"),
    (None, "a LongTensor"),
    ([2 ** 70], "a LongTensor"),
    ([V], f"token id {V} out of range"),
    (torch.zeros(2, 0, dtype=torch.long), r"shape \[B, T\]"),
    (torch.zeros(1, 1, 1, dtype=torch.long), r"shape \[B, T\]"),
])
def test_bad_token_batches(bad, message):
    with pytest.raises(ValueError, match=message) as err:
        as_token_batch(bad, V)
    assert "\n" not in str(err.value)


def test_numpy_ids_are_accepted():
    assert as_token_batch(np.array([[3, 4]], dtype=np.int32), V).tolist() == [[3, 4]]


@pytest.mark.parametrize("prompt", [b"hello", bytearray(b"hi"), [b"a", b"b"], ["a", 1]])
def test_bytes_prompts_say_what_is_accepted(prompt):
    with pytest.raises(ValueError, match="prompt must be a str, a list of equally long str, or token ids"):
        prompt_to_ids(prompt, rwkv_engine.tokenizer(), 50277)


def test_lone_surrogate_in_a_prompt_is_a_value_error():
    with pytest.raises(ValueError, match=r"prompt text is not valid Unicode .*'\\ud800'"):
        prompt_to_ids("abc\ud800def", rwkv_engine.tokenizer(), 50277)
    with pytest.raises(ValueError, match="not valid Unicode"):
        prompt_to_ids(["ab", "\udfff"], rwkv_engine.tokenizer(), 50277)


def test_dtype_names():
    assert as_dtype("bf16") is torch.bfloat16 and as_dtype(torch.float16) is torch.float16
    for bad in ("int8", torch.int8, None, 4):
        with pytest.raises(ValueError, match="unsupported dtype"):
            as_dtype(bad)


def test_engine_and_baselines_follow_the_contract(tmp_path):
    import baselines
    cfg = baselines.GPTNeoXConfig(1, 32, 2, V, max_len=64, name="toy")
    baselines.write_synthetic(cfg, tmp_path / "toy")
    transformer = baselines.load(str(tmp_path / "toy"))
    for model in (rwkv_engine.load("rwkv-4-tiny"), transformer, baselines.PaperProtocol(transformer)):
        assert isinstance(model, Model), model
    assert not isinstance(object(), Model)


def _import_graph(package_dir, package):
    """module -> modules of `package` it imports, anywhere in the file (lazy imports count)."""
    import ast
    graph = {}
    for f in package_dir.glob("*.py"):
        me = package if f.stem == "__init__" else f"{package}.{f.stem}"
        edges = graph.setdefault(me, set())
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = f"{package}.{node.module}" if node.level else node.module
                base = package if node.level and not node.module else base
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    edges.add(sub if (package_dir / f"{alias.name}.py").exists() and base == package else base)
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names)
        edges.discard(me)
    return {m: {e for e in es if e in graph and e != package} for m, es in graph.items()}


def test_no_import_cycle_in_the_engine():
    import pathlib
    root = pathlib.Path(rwkv_engine.__file__).parent
    graph = _import_graph(root, "rwkv_engine")
    assert "rwkv_engine.generation" in graph["rwkv_engine.model"]          # the graph is really read
    state = {}

    def visit(m, path):
        state[m] = "open"
        for nxt in graph[m]:
            assert state.get(nxt) != "open", f"import cycle: {' -> '.join(path + [nxt])}"
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[m] = "done"
    for m in graph:
        if m not in state:
            visit(m, [m])
