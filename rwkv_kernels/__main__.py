"""`python -m rwkv_kernels`: print the dispatch table and whether this machine has the C build."""
from .dispatch import describe

print(describe())
