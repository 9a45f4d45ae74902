"""Benchmarks reproducing Appendix K of the RWKV paper (Figures 13/14) and checking this engine.

    python -m bench.machine     this machine's read bandwidth and fp32 GEMM throughput (cached)
    python -m bench.generate    time and peak memory (excluding parameters) of one model
    python -m bench.sweep       every family x size that fits: Figures 13 and 14
    python -m bench.seqlen      memory and per-token latency against position, up to 16k tokens
    python -m bench.peers       the same checkpoint through our engine, BlinkDL's rwkv, transformers
    python -m bench.modes       prompt throughput: sequence mode vs token mode
    python -m bench.gpu_check   one-shot check of the Triton kernel and the CUDA path on a lent GPU

Every measurement runs in a fresh child process (`bench.runner`, which measures the implementations
registered in `bench.runners`) that dies with its parent; see `bench.memory` for how peak memory
excluding parameters is measured and `bench.cpuload` for how the machine's load during a run is
recorded. `bench.cli` holds what the commands share (one-line errors, argument and path checks).
"""
import rwkv_kernels  # noqa: F401,E402  (first: sets torch's OpenMP spin before torch loads; see rwkv_kernels/__init__)


# The paper's prompt: a leading newline, then one paragraph: PROMPT_TOKENS tokens with the 20B
# tokenizer (tests/test_bench.py checks the count); memory and time estimates use that length.
DRAGON_PROMPT = ("\nIn a shocking finding, scientist discovered a herd of dragons living in a remote, "
                 "previously unexplored valley, in Tibet. Even more surprising to the researchers was "
                 "the fact that the dragons spoke perfect Chinese.")
PROMPT_TOKENS = 41
