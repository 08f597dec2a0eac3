"""The quantizer's fast paths (a C loop on the CPU, Triton kernels on CUDA) against the paper's
formulas and against the eager path, element for element.

The paper's formulas are written out here in float64 numpy (as in test_quantizer.py):

    forward   v_hat = round(clip(v/s, -Qn, Qp)) * s
    dv_hat/dv = 1 if -Qn < v/s < Qp else 0                       (unrounded v/s)
    dv_hat/ds = round(v/s) - v/s inside, -Qn if v/s <= -Qn, Qp if v/s >= Qp
    step gradient = sum(upstream * dv_hat/ds) * g
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from paper_formulas import paper_range

from lsq import kernels_cpu
from lsq import quantizer as Q

# the CUDA cases show as skipped where there is no GPU, not as absent
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]
S = 0.25  # a power of two: v = x * S and v / S are exact in float32
SHAPES = [(128, 16, 8, 8), (16, 16, 3, 3), (4, 7, 5, 3), (33, 10), (257,)]  # the first spans threads


def needs_fast_path(device: str, v: torch.Tensor):
    if Q.fast_path(v) is None:
        pytest.skip(f"no fast path on {device} here (no C compiler / torch.compile): eager only")


def paper(v: np.ndarray, s: float, qn: int, qp: int, up: np.ndarray):
    x = v.astype(np.float64) / s
    inside = (x > -qn) & (x < qp)
    ds = np.where(inside, np.round(x) - x, np.where(x <= -qn, -float(qn), float(qp)))
    terms = up.astype(np.float64) * ds
    return np.round(np.clip(x, -qn, qp)) * s, up * inside, terms.sum(), np.abs(terms).sum()


def unit_values(qn: int, qp: int, gen: torch.Generator, n: int) -> torch.Tensor:
    """v/s values: exactly on both bounds, in the half-step band just outside, ties, far out,
    and uniform inside. None of the inside values is a .5 tie unless listed as one."""
    special = [
        -qn,
        qp,
        qp + 0.25,
        qp + 0.49,
        qp + 0.5,
        -qn - 0.25,
        -qn - 0.49,
        -qn - 0.5,
        qp + 9.75,
        -qn - 40.0,
        0.0,
        0.5,
        -0.5,
        1.5,
        qp - 0.5,
        qp - 1.0,
        -3.0,
    ]
    inside = torch.empty(n, dtype=torch.float64).uniform_(-qn - 2, qp + 2, generator=gen)
    values = torch.cat([torch.tensor(special, dtype=torch.float64), inside])[:n]
    return values[torch.randperm(n, generator=gen)]


def run(v: torch.Tensor, up: torch.Tensor, bits: int, signed: bool, step: float, fast: bool):
    q = Q.LsqQuantizer(bits, signed, "weight").to(v.device)
    with torch.no_grad():
        q.step.fill_(step)
        q.initialized.fill_(True)
    old, Q.FAST_PATH = Q.FAST_PATH, fast
    try:
        vv = v.detach().clone().requires_grad_(True)
        out = q(vv)
        out.backward(up)
    finally:
        Q.FAST_PATH = old
    return out.detach(), vv.grad, q.step.grad.detach()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits,signed", [(2, True), (3, False), (4, False), (4, True), (8, True), (8, False)])
def test_fast_path_equals_paper_and_eager(device, shape, bits, signed, seed):
    qn, qp = paper_range(bits, signed)
    n = math.prod(shape)
    v = (unit_values(qn, qp, seed, n) * S).float().reshape(shape).to(device)
    up = torch.randn(shape, generator=seed).to(device)
    needs_fast_path(device, v)

    out, gv, gs = run(v, up, bits, signed, S, fast=True)
    e_out, e_gv, e_gs = run(v, up, bits, signed, S, fast=False)
    fwd, ref_gv, ref_gs, scale = paper(v.cpu().numpy(), S, qn, qp, up.cpu().numpy())
    g = 1 / math.sqrt(n * qp)

    assert torch.equal(out, e_out) and torch.equal(gv, e_gv)
    assert np.array_equal(out.cpu().double().numpy(), fwd)
    assert np.array_equal(gv.cpu().double().numpy(), ref_gv)
    assert float(gs) == pytest.approx(ref_gs * g, rel=1e-5, abs=1e-6 * scale * g)
    assert float(gs) == pytest.approx(float(e_gs), rel=1e-5, abs=1e-6 * scale * g)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("step", [0.3, 0.0123, 1.7])
def test_non_power_of_two_step_is_bit_identical_to_eager(device, step, seed):
    """Any step: the fast path divides v by s in float32 exactly like the eager path."""
    v = (torch.randn(64, 32, 9, 9, generator=seed) * 3).to(device)
    up = torch.randn(v.shape, generator=seed).to(device)
    needs_fast_path(device, v)
    for bits, signed in [(2, True), (4, False), (8, True)]:
        out, gv, gs = run(v, up, bits, signed, step, fast=True)
        e_out, e_gv, e_gs = run(v, up, bits, signed, step, fast=False)
        assert torch.equal(out, e_out) and torch.equal(gv, e_gv)
        assert float(gs) == pytest.approx(float(e_gs), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_and_mismatched_gradient_strides(device, seed):
    v = (torch.randn(8, 16, 6, 6, generator=seed) * 2).to(device).to(memory_format=torch.channels_last)
    up = torch.randn(v.shape, generator=seed).to(device)  # contiguous, unlike v
    needs_fast_path(device, v)
    out, gv, gs = run(v, up, 4, True, S, fast=True)
    e_out, e_gv, e_gs = run(v, up, 4, True, S, fast=False)
    assert torch.equal(out, e_out) and torch.equal(gv, e_gv)
    assert float(gs) == pytest.approx(float(e_gs), rel=1e-5)
    # a non-dense input (a strided view) works too: it takes the eager path
    w = v[:, ::2]
    assert torch.equal(
        run(w, up[:, ::2], 4, True, S, fast=True)[0], run(w, up[:, ::2], 4, True, S, fast=False)[0]
    )


@pytest.mark.parametrize("device", DEVICES)
def test_nan_and_inf_behave_as_in_the_eager_path(device):
    v = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.3, 5.0]).to(device)
    up = torch.tensor([1.0, 1.0, 1.0, float("nan"), float("inf")]).to(device)
    needs_fast_path(device, v)
    out, gv, gs = run(v, up, 4, True, S, fast=True)
    e_out, e_gv, e_gs = run(v, up, 4, True, S, fast=False)
    assert torch.equal(out.isnan(), e_out.isnan()) and torch.equal(out.nan_to_num(), e_out.nan_to_num())
    assert torch.equal(gv.isnan(), e_gv.isnan()) and torch.equal(gv.nan_to_num(), e_gv.nan_to_num())
    assert math.isnan(float(gs)) and math.isnan(float(e_gs))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("step", [0.0, -0.5, 1e-9, Q.STEP_EPS, float("nan")])
def test_steps_at_or_below_the_clamp_and_a_nan_step_as_in_the_eager_path(device, step, seed):
    """The fast path reads the step itself: s = step.clamp_min(STEP_EPS), a NaN step staying NaN
    (torch.clamp_min's rule), in the forward and in the step's gradient."""
    v = (torch.randn(6, 5, generator=seed) * 1e-7).to(
        device
    )  # v/s on both sides of the range at s = STEP_EPS
    up = torch.randn(v.shape, generator=seed).to(device)
    needs_fast_path(device, v)
    out, gv, gs = run(v, up, 4, True, step, fast=True)
    e_out, e_gv, e_gs = run(v, up, 4, True, step, fast=False)
    if math.isnan(step):
        assert out.isnan().all() and e_out.isnan().all() and math.isnan(float(gs)) and math.isnan(float(e_gs))
        return
    s = float(torch.tensor(Q.STEP_EPS))  # the clamp's value, as float32
    qn, qp = paper_range(4, signed=True)  # (8, 7)
    fwd, ref_gv, ref_gs, scale = paper(v.cpu().numpy(), s, qn, qp, up.cpu().numpy())
    assert torch.equal(out, e_out) and torch.equal(gv, e_gv)
    assert np.allclose(out.cpu().double().numpy(), fwd, rtol=1e-6, atol=0)  # s * k with a float32 s
    assert np.array_equal(gv.cpu().double().numpy(), ref_gv)
    g = 1 / math.sqrt(v.numel() * qp)
    assert float(gs) == pytest.approx(ref_gs * g, rel=1e-5, abs=1e-6 * scale * g)
    assert float(gs) == pytest.approx(float(e_gs), rel=1e-5, abs=1e-6 * scale * g)


def test_cpu_fast_path_is_in_use_where_a_compiler_exists():
    """Guards against the fast path silently never running (e.g. the build broke)."""
    import shutil

    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler on this machine")
    assert Q.fast_path(torch.ones(4)) is not None
    assert Q.fast_path(torch.ones(4, dtype=torch.bfloat16)) is None  # bf16: eager path


def test_without_a_compiler_the_eager_path_takes_over(monkeypatch, tmp_path, seed):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setenv("LSQ_KERNEL_DIR", str(tmp_path))
    monkeypatch.setattr(kernels_cpu.shutil, "which", lambda name: "/bin/false")
    monkeypatch.setattr(Q, "KERNELS", {})
    v = torch.randn(4, 5, generator=seed)
    with pytest.warns(UserWarning, match="fast path unavailable"):
        assert Q.fast_path(v) is None
    out, gv, _ = run(v, torch.ones_like(v), 4, True, S, fast=True)
    assert torch.equal(out, run(v, torch.ones_like(v), 4, True, S, fast=False)[0])


def test_without_a_usable_cache_the_library_is_built_in_a_private_folder(monkeypatch, tmp_path):
    """Never loaded from a path another user could have written first (a fixed name in the shared
    temporary folder): built by this process in a fresh folder that only this user can write."""
    import os
    import tempfile

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("LSQ_KERNEL_DIR", str(blocker / "kernels"))  # under a file: makedirs fails
    monkeypatch.setattr(kernels_cpu.shutil, "which", lambda name: "/usr/bin/cc")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the shared temporary folder, here
    built, loaded = [], []

    def compile_library(cc, flags, path):
        os.makedirs(os.path.dirname(path), exist_ok=True)  # as the real one starts
        open(path, "w").close()
        built.append(path)

    monkeypatch.setattr(kernels_cpu, "compile_library", compile_library)
    monkeypatch.setattr(kernels_cpu.ctypes, "CDLL", loaded.append)
    kernels_cpu.build_library()
    folder = os.path.dirname(loaded[0])
    assert loaded == built[-1:] and folder != tempfile.gettempdir()
    assert os.stat(folder).st_uid == os.getuid() and os.stat(folder).st_mode & 0o077 == 0


@pytest.mark.slow  # Triton's interpreter
def test_the_cuda_triton_kernels_follow_the_paper():
    """lsq/kernels_cuda.py, the fast path on CUDA, through its self-check (bench/_triton_lsq.py; here in
    Triton's interpreter on the CPU): forward and grad_v against the paper's formulas at every
    clip bound, rounding tie, NaN and inf, bf16 and channels_last; the step clamped on the device
    (zero, negative, tiny and NaN steps) and scaled by g; the saved-tensor codes; and
    LsqFunction with the kernels against its eager path; the image conv's step gradient."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, os.path.join(root, "bench", "_triton_lsq.py")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TRITON_INTERPRET": "1"},
    )
    lines = [line for line in out.stdout.splitlines() if " -> " in line]
    assert out.returncode == 0 and len(lines) == 16 and all(line.endswith("-> ok") for line in lines), (
        out.stdout + out.stderr
    )


class _EagerKernels:
    """A fast path that is the eager path itself, or one with a fault: a code off by one, the
    step gradient without g, or no clamp of the step."""

    def __init__(self, off: int = 0, no_g: bool = False, no_clamp: bool = False):
        self.off, self.no_g, self.no_clamp = off, no_g, no_clamp

    def _s(self, step):
        return step if self.no_clamp else step.clamp_min(Q.STEP_EPS)

    def forward(self, v, step, qn, qp):
        return Q.eager_forward(v, self._s(step), qn, qp)

    def backward(self, v, step, grad, qn, qp, g):
        grad_v, grad_s = Q.eager_backward(v, self._s(step), grad, qn, qp)
        return grad_v, (grad_s * (1.0 if self.no_g else g)).reshape(step.shape)

    def encode(self, v, s, signed):
        k = (v.float() / s).round()
        k[0] += self.off
        return k.to(torch.int8)

    def decode(self, codes, s):
        return codes.float() * s


def test_a_gpu_fast_path_is_checked_against_the_eager_path_before_use():
    """Kernels that build but compute something else (another GPU, another Triton) must not
    train: `check_kernels` passes the eager path itself and refuses one wrong code, which
    `fast_path` then turns into a warning and the eager path."""
    check_kernels = pytest.importorskip("lsq.kernels_cuda").check_kernels  # (it needs triton)
    good = _EagerKernels()
    assert check_kernels(good, torch.device("cpu")) is good
    for fault in ({"off": 1}, {"no_g": True}, {"no_clamp": True}):
        with pytest.raises(RuntimeError, match="disagrees with the eager path"):
            check_kernels(_EagerKernels(**fault), torch.device("cpu"))


@pytest.mark.parametrize(
    "value, on",
    [
        ("0", False),
        ("false", False),
        ("No", False),
        ("OFF", False),
        ("1", True),
        ("True", True),
        ("yes", True),
        (" on ", True),
        ("", True),
    ],
)
def test_lsq_fast_path_reads_the_usual_spellings(value, on, monkeypatch):
    """LSQ_FAST_PATH=false (no, off) kept the fast path on: only '0' turned it off."""
    monkeypatch.setenv("LSQ_FAST_PATH", value)
    monkeypatch.setattr(Q, "FAST_PATH", None)  # (None: read from the environment at the first call)
    assert Q.fast_path_on() is on and Q.FAST_PATH is on


def test_lsq_fast_path_with_another_value_is_an_error(monkeypatch):
    monkeypatch.setenv("LSQ_FAST_PATH", "maybe")
    monkeypatch.setattr(Q, "FAST_PATH", None)
    with pytest.raises(
        ValueError, match=r"environment variable LSQ_FAST_PATH='maybe': allowed: 1, true, yes, on or 0"
    ):
        Q.LsqQuantizer(4, True, "weight")(torch.ones(8))
