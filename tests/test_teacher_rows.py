"""backend="triton" reads one teacher's own rows, with their inverse norms, instead of a copy
of its unit rows (several teachers still go as their weighted unit rows side by side, in the
teachers' precision, bf16 as fp16): against the float64 reference on raw rows of varied norms with an
all-zero row, sliced out of a wider tensor, in the student's dtype or another; and no [B, Dt]
tensor is ever allocated for it."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import distillcse
import distillcse.api as api
from conftest import DEVICE, requires_triton
from test_losses import rel_err

pytestmark = requires_triton

B, D, DT = 70, 40, 56  # distinct sizes: a [B, DT] tensor can only be the teacher or a copy of it


def make(t_dtype, seed=0):
    """Student z [B, D] fp32 and one teacher's raw rows [B, DT] in ``t_dtype``: norms spread over
    1/5..5, row 3 all zero, a column slice of a wider tensor (row stride DT + 5)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(1, D, generator=g) + torch.randn(B, D, generator=g)
    e = torch.randn(1, DT, generator=g) + 0.8 * torch.randn(B, DT, generator=g)
    e = e * 5.0 ** (2 * torch.rand(B, 1, generator=g) - 1)
    e[3] = 0.0
    wide = torch.cat([torch.randn(B, 3, generator=g), e, torch.randn(B, 2, generator=g)], dim=1)
    return z.to(DEVICE), wide.to(device=DEVICE, dtype=t_dtype)[:, 3:3 + DT]


def loss_and_grad(z, teachers, backend, **kw):
    z = z.detach().requires_grad_()
    loss = distillcse.distill_loss(z, teachers, backend=backend, **kw)
    loss.backward()
    return loss.detach().double().cpu(), z.grad.double().cpu()


@pytest.mark.parametrize("t_dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("shuffle", ["none", "expected"])
def test_one_raw_teacher_matches_reference(shuffle, t_dtype):
    z, e = make(t_dtype)
    assert e.stride() == (DT + 5, 1)
    kw = dict(shuffle=shuffle, group_p=0.25)
    ref_loss, ref_grad = loss_and_grad(z.double().cpu(), e.double().cpu(), "reference", **kw)
    loss, grad = loss_and_grad(z, e, "triton", **kw)
    assert rel_err(loss, ref_loss, floor=1.0) < 2e-5
    assert rel_err(grad, ref_grad) < 2e-5


@pytest.mark.parametrize("B_", [50, 130], ids=["one-program", "streaming"])
def test_several_teachers_keep_their_precision(B_):
    """A bf16 student with three fp32 teachers: their weighted unit rows go side by side in fp32,
    not the student's dtype (bf16 unit rows put ~1e-3 on the loss: t / tau_t magnifies them)."""
    g = torch.Generator().manual_seed(4)
    z = (torch.randn(1, D, generator=g) + torch.randn(B_, D, generator=g)).to(torch.bfloat16)
    teachers = [torch.randn(1, d, generator=g) + 0.8 * torch.randn(B_, d, generator=g) for d in (32, 24, DT)]
    kw = dict(shuffle="expected", teacher_weights=[0.5, 0.2, 0.3])
    ref_loss, ref_grad = loss_and_grad(z.double(), [e.double() for e in teachers], "reference", **kw)
    loss, grad = loss_and_grad(z.to(DEVICE), [e.to(DEVICE) for e in teachers], "triton", **kw)
    assert rel_err(loss, ref_loss, floor=1.0) < 2e-5
    assert rel_err(grad, ref_grad) < 1e-2  # stored in bf16


def test_teachers_of_mixed_dtypes_go_in_the_widest():
    """An fp16 teacher beside an fp32 one: their unit rows go in fp32 (the dtypes promoted), not
    the first teacher's fp16; the loss and gradient then match float64 on the same inputs."""
    g = torch.Generator().manual_seed(9)
    z = torch.randn(1, D, generator=g) + torch.randn(50, D, generator=g)  # [50, D]: one program
    teachers = [(torch.randn(1, d, generator=g) + 0.8 * torch.randn(50, d, generator=g)).to(dtype)
                for d, dtype in ((32, torch.float16), (DT, torch.float32))]
    rows, unit_rows = api._triton_teacher(teachers, [0.5, 0.5])
    assert unit_rows and rows.dtype == torch.float32 and rows.shape == (50, 32 + DT)
    kw = dict(shuffle="expected", teacher_weights=[0.5, 0.5])
    ref_loss, ref_grad = loss_and_grad(z.double(), [e.double() for e in teachers], "reference", **kw)
    loss, grad = loss_and_grad(z.to(DEVICE), [e.to(DEVICE) for e in teachers], "triton", **kw)
    assert rel_err(loss, ref_loss, floor=1.0) < 2e-6  # 2e-7 and 1.1e-6 here; fp16 rows: 1.4e-5 and 5.5e-4
    assert rel_err(grad, ref_grad) < 2e-5


@pytest.mark.parametrize("B_", [50, 130], ids=["one-program", "streaming"])
def test_several_teachers_with_zero_rows(B_):
    """K = 2 fp32 teachers, the first with all-zero rows: those rows' weighted unit rows have
    norm sqrt(w_2) < 1, and t_ij = w_1 * 0 + w_2 cos_2 (cos as torch.cosine_similarity), so the
    kernels take the unit rows as they are: normalising them again scaled those rows' logits
    by 1 / sqrt(w_2)."""
    g = torch.Generator().manual_seed(6)
    z = torch.randn(1, D, generator=g) + torch.randn(B_, D, generator=g)
    teachers = [torch.randn(1, d, generator=g) + 0.8 * torch.randn(B_, d, generator=g) for d in (32, 24)]
    teachers[0][::5] = 0.0
    kw = dict(shuffle="expected", teacher_weights=[0.6, 0.4])
    ref_loss, ref_grad = loss_and_grad(z.double(), [e.double() for e in teachers], "reference", **kw)
    loss, grad = loss_and_grad(z.to(DEVICE), [e.to(DEVICE) for e in teachers], "triton", **kw)
    assert rel_err(loss, ref_loss, floor=1.0) < 2e-5
    assert rel_err(grad, ref_grad) < 2e-5


@pytest.mark.parametrize("B_", [50, 130], ids=["one-program", "streaming"])
@pytest.mark.parametrize("scale", [1e39, 1e-9])
def test_one_float64_teacher_beyond_the_kernels_range(B_, scale):
    """One float64 teacher whose norms no kernel dtype holds (1e39 overflows fp32, 1e-9 is
    subnormal in fp16) goes as float32 unit rows normalised in float64, as several teachers do.
    Its raw rows were cast to the student's fp16: a NaN loss at 1e39, 13% off at 1e-9."""
    g = torch.Generator().manual_seed(5)
    z = (torch.randn(1, D, generator=g) + torch.randn(B_, D, generator=g)).to(torch.float16)
    e = (torch.randn(1, DT, generator=g) + 0.8 * torch.randn(B_, DT, generator=g)).double() * scale
    kw = dict(shuffle="expected")
    ref_loss, ref_grad = loss_and_grad(z.double(), e, "reference", **kw)
    loss, grad = loss_and_grad(z.to(DEVICE), e.to(DEVICE), "triton", **kw)
    assert rel_err(loss, ref_loss, floor=1.0) < 2e-5
    assert rel_err(grad, ref_grad) < 1e-2  # stored in fp16


def test_one_raw_teacher_many_groups():
    """B - 1 = 69 groups (more than the kernels take) run on the torch backend's row chunks,
    which get the teacher's unit rows from the same rows and inverse norms."""
    z, e = make(torch.float16)
    kw = dict(shuffle="expected", group_size=1)
    ref_loss, ref_grad = loss_and_grad(z.double().cpu(), e.double().cpu(), "reference", **kw)
    loss, grad = loss_and_grad(z, e, "triton", **kw)
    assert rel_err(loss, ref_loss, floor=1.0) < 2e-5
    assert rel_err(grad, ref_grad) < 2e-5


def test_many_groups_in_the_combined_loss():
    """distillcse_loss with B - 1 = 69 groups (more than the kernels take): each term on its own
    path, the distillation's on the torch backend's row chunks, weighted by distill_weight (0.7),
    and an all-zero row of z1 divided by eps there as cos does (a finite gradient), matching the
    float64 reference on the same fp32 values (fp32 tolerances, as above)."""
    z, e = make(torch.float32)
    z[5] = 0.0
    z2 = z + torch.randn(B, D, generator=torch.Generator().manual_seed(4)).to(DEVICE)  # [B, D]
    kw = dict(shuffle="expected", group_size=1, distill_weight=0.7)
    results = {}
    for backend, dtype, device in (("reference", torch.float64, "cpu"), ("triton", torch.float32, DEVICE)):
        leaves = [x.to(device, dtype).requires_grad_() for x in (z, z2)]
        loss = distillcse.distillcse_loss(*leaves, e.to(device, dtype), backend=backend, **kw)
        results[backend] = loss.detach().double().cpu(), [g.double().cpu() for g in torch.autograd.grad(loss, leaves)]
    (ref_loss, ref_grads), (loss, grads) = results["reference"], results["triton"]
    assert rel_err(loss, ref_loss, floor=1.0) < 2e-5
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) < 2e-5


@pytest.mark.parametrize("t_dtype", [torch.float32, torch.float16], ids=str)
def test_one_raw_teacher_random_shuffle_matches_torch_backend(t_dtype):
    """The torch backend's fp32 unit rows and the kernels' raw rows give the same groups."""
    z, e = make(t_dtype, seed=1)
    kw = dict(shuffle="random", seed=5, group_p=0.25)
    ref_loss, ref_grad = loss_and_grad(z.cpu(), e.cpu(), "torch", **kw)
    loss, grad = loss_and_grad(z, e, "triton", **kw)
    assert rel_err(loss, ref_loss, floor=1.0) < 2e-5
    assert rel_err(grad, ref_grad) < 2e-5


class TeacherSizedOutputs(TorchDispatchMode):
    """Records (op, shape, dtype) of every floating-point op output with a dimension of DT and
    at least B * DT elements that does not alias ``teacher``'s storage (a view of it is no copy)."""

    def __init__(self, teacher, found):
        super().__init__()
        self.storage = teacher.untyped_storage().data_ptr()
        self.found = found

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (isinstance(t, torch.Tensor) and t.is_floating_point() and DT in t.shape
                    and t.numel() >= B * DT and t.untyped_storage().data_ptr() != self.storage):
                self.found.append((str(func), tuple(t.shape), t.dtype))
        return out


def teacher_sized_outputs(monkeypatch, z, teachers, teacher, **kw):
    """What ``TeacherSizedOutputs`` records in the distillation term's forward past the input
    checks (``api._distill``: their finiteness test allocates [B, DT] temporaries) and backward,
    outside ``matmul_f32`` (cuBLAS reads the rows in place; the CPU's stand-in for its 16-bit
    inputs converts them slice by slice, which is not the code under test)."""
    from distillcse.kernels import distill as kernels_distill
    from distillcse.kernels import group_partition as kernels_groups

    found, distill, matmul = [], api._distill, kernels_distill.matmul_f32

    def recorded(*args):
        with TeacherSizedOutputs(teacher, found):
            return distill(*args)

    def unrecorded_matmul(*args, **kwargs):
        with _disable_current_modes():
            return matmul(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(api, "_distill", recorded)
        patch.setattr(kernels_distill, "matmul_f32", unrecorded_matmul)
        patch.setattr(kernels_groups, "matmul_f32", unrecorded_matmul)
        z = z.detach().requires_grad_()
        loss = distillcse.distill_loss(z, teachers, backend="triton", **kw)
    with TeacherSizedOutputs(teacher, found):
        loss.backward()
    return found


@pytest.mark.parametrize("t_dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shuffle", ["none", "expected", "random"])
def test_one_teacher_is_never_copied(shuffle, t_dtype, monkeypatch):
    """Forward and backward with K = 1 allocate no [B, DT] tensor; with K = 2 teachers of DT / 2
    features each, the concatenation of their unit rows is one (the detector works)."""
    z, e = make(t_dtype)
    kw = dict(shuffle=shuffle, seed=3, group_p=0.25)
    assert teacher_sized_outputs(monkeypatch, z, e, e, **kw) == []
    two = teacher_sized_outputs(monkeypatch, z, [e[:, :DT // 2], e[:, DT // 2:]], e, **kw)
    assert any(shape == (B, DT) for _, shape, _ in two)


@pytest.mark.parametrize("B_", [50, 130], ids=["one-program", "streaming"])
def test_several_bf16_teachers_go_as_fp16_unit_rows(B_):
    """Two bf16 teachers: their weighted unit rows (|u| <= 1) go side by side in fp16, whose
    10-bit mantissa keeps t / tau_t close to the torch backend's fp32 arithmetic on the same
    inputs (loss 3-7e-5, gradient ~3e-3 apart); bf16 rows (8 bits) were ~1e-3 and ~1.2e-2 apart."""
    g = torch.Generator().manual_seed(7)
    z = (torch.randn(1, D, generator=g) + torch.randn(B_, D, generator=g)).to(torch.bfloat16)
    teachers = [(torch.randn(1, d, generator=g) + 0.8 * torch.randn(B_, d, generator=g)).to(torch.bfloat16)
                for d in (48, DT)]
    kw = dict(shuffle="none", teacher_weights=[0.6, 0.4])
    want_loss, want_grad = loss_and_grad(z, teachers, "torch", **kw)
    loss, grad = loss_and_grad(z.to(DEVICE), [e.to(DEVICE) for e in teachers], "triton", **kw)
    assert rel_err(loss, want_loss, floor=1.0) < 2e-4
    assert rel_err(grad, want_grad) < 6e-3
