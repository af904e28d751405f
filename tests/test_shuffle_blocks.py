"""On a CPU ``group_permutation`` runs in blocks (``CPU_BLOCK_PER_THREAD`` entries a thread) and
walks cycles across blocks: the block size must not change sigma (one block, and the kernels'
sigma, are checked in test_kernel_distill.py), and each full domain is still permuted."""
import torch

from distillcse import shuffle
from distillcse.shuffle import group_keys, group_permutation


def test_blocks_do_not_change_sigma(monkeypatch):
    n = torch.tensor([1, 2, 3, 5, 200, 255, 256, 300, 1000, 4099])  # 24 and 12 rounds, h = 0 at n = 1
    x = torch.cat([torch.arange(int(v)) for v in n])
    sizes = n.repeat_interleave(n)
    key = group_keys(11, sizes, torch.tensor(2))
    whole = group_permutation(x, sizes, key)  # 6121 entries: one block
    for s, v in zip((n.cumsum(0) - n).tolist(), n.tolist()):
        assert torch.equal(whole[s:s + v].sort().values, torch.arange(v))
    for per_thread in (1, 7, 64, 1000):
        monkeypatch.setattr(shuffle, "CPU_BLOCK_PER_THREAD", per_thread)
        assert torch.equal(group_permutation(x, sizes, key), whole), per_thread
