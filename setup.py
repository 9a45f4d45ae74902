from setuptools import find_packages, setup

setup(
    name="rwkv_engine",
    version="0.1.0",
    description="A from-scratch RWKV-4 inference engine with its own kernels, and the RWKV paper's "
                "Appendix K benchmark against KV-cache transformer baselines",
    python_requires=">=3.10",
    packages=find_packages(include=["rwkv_engine", "rwkv_engine.*", "rwkv_kernels", "rwkv_kernels.*",
                                    "baselines", "baselines.*", "bench", "bench.*"]),
    package_data={"rwkv_engine": ["data/20B_tokenizer.json"], "rwkv_kernels": ["csrc/*.c", "csrc/*.h"]},
    install_requires=["torch>=2.1", "numpy", "triton", "tokenizers", "safetensors", "psutil",
                      "threadpoolctl", "matplotlib", "tqdm",
                      "fastapi", "uvicorn", "prometheus_client",          # fastapi..: rwkv_engine.serve
                      "aiohttp"],                                          # bench.serve's clients
    extras_require={"test": ["pytest", "rwkv==0.8.32", "transformers>=4.40", "openai", "httpx"]},
)
