"""Padded slab rows on a GPU: a training step at batch sizes around ``utils.PAD_MIN_COLS``.

    python benchmarks/time_padding.py                      # B = 2000 4000 4096 5000 5008, D = Dt = 768
    python benchmarks/time_padding.py --B 3000 6000 --D 384

Above ``PAD_MIN_COLS`` (4,096) columns the slabs' rows are padded to a multiple of 16
(``utils.slab_buffer``): the slab kernels' loads stay vectorised at a B that is not a multiple
of 16, at one zero fill (a PyTorch kernel) per slab buffer. Below it they are not, as the fills'
launches were predicted to cost more than the aligned loads save (session 22; offline only).
This times one forward+backward of ``distillcse_loss`` (triton backend, bf16, K = 1) with every
slab unpadded and with every slab padded, so that the constant can be set from it. Median of
``triton.testing.do_bench``.
"""
import argparse

import torch


def main():
    from triton.testing import do_bench

    import distillcse
    from distillcse.kernels import utils

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, nargs="+", default=[2000, 4000, 4096, 5000, 5008])
    p.add_argument("--D", type=int, default=768)
    p.add_argument("--Dt", type=int, default=768)
    p.add_argument("--shuffle", nargs="+", default=["expected", "random"])
    a = p.parse_args()
    if not torch.cuda.is_available():
        p.error("needs a GPU")
    default = utils.PAD_MIN_COLS
    print(f"# forward+backward on {torch.cuda.get_device_name()}, bf16, D = {a.D}, Dt = {a.Dt}, K = 1; "
          f"PAD_MIN_COLS = {default}")
    print("| B | shuffle | unpadded ms | padded ms | padded / unpadded | default |")
    print("|---|---|---|---|---|---|")
    for B in a.B:
        g = torch.Generator(device="cuda").manual_seed(B)
        z1 = torch.randn(B, a.D, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
        z2 = (z1.detach() + torch.randn(B, a.D, device="cuda", generator=g, dtype=torch.bfloat16)).requires_grad_()
        teacher = torch.randn(B, a.Dt, device="cuda", generator=g, dtype=torch.bfloat16)
        for shuffle in a.shuffle:
            def step():
                loss = distillcse.distillcse_loss(z1, z2, [teacher], shuffle=shuffle, seed=1, backend="triton")
                torch.autograd.grad(loss, (z1, z2))
            ms = {}
            for name, threshold in (("unpadded", 1 << 62), ("padded", 0)):
                utils.PAD_MIN_COLS = threshold
                step()  # compile
                ms[name] = do_bench(step, return_mode="median")
            utils.PAD_MIN_COLS = default
            print(f"| {B} | {shuffle} | {ms['unpadded']:.3f} | {ms['padded']:.3f} | "
                  f"{ms['padded'] / ms['unpadded']:.3f} | {'padded' if B > default else 'unpadded'} |", flush=True)


if __name__ == "__main__":
    main()
