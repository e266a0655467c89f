"""linear_cross_entropy against the materialised-logits reference (F.linear + F.cross_entropy)."""

import pytest
import torch
import torch.nn.functional as F

from zerolm.train.losses import _chunk_rows, linear_cross_entropy


def _case(N=1300, D=24, V=8192, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).requires_grad_()
    w = (torch.randn(V, D, generator=g) * 0.1).requires_grad_()
    b = torch.randn(V, generator=g).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    y[::5] = -100  # ignored rows
    return h, w, b, y


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("bias", [True, False])
def test_same_loss_and_gradients_as_full_logits(smoothing, bias):
    h, w, b, y = _case()
    assert len(h) > 2 * _chunk_rows(w.shape[0])  # several blocks of rows
    b = b if bias else None
    inputs = (h, w) + ((b,) if bias else ())
    ref = F.cross_entropy(
        F.linear(h, w, b).float(), y, ignore_index=-100, label_smoothing=smoothing
    )
    out = linear_cross_entropy(
        h.view(13, 100, -1), w, b, y.view(13, 100), label_smoothing=smoothing
    )
    assert out.item() == pytest.approx(ref.item(), abs=1e-5)
    for got, want in zip(torch.autograd.grad(out, inputs), torch.autograd.grad(ref, inputs)):
        assert torch.allclose(got, want, atol=1e-7, rtol=1e-4)


def test_bf16_autocast_within_bf16_rounding():
    h, w, b, y = _case(N=700)
    with torch.autocast("cpu", torch.bfloat16):
        ref = F.cross_entropy(F.linear(h, w, b).float(), y, ignore_index=-100, label_smoothing=0.1)
        out = linear_cross_entropy(h, w, b, y, label_smoothing=0.1)
        grads = [torch.autograd.grad(v, (h, w, b)) for v in (out, ref)]
    assert out.item() == pytest.approx(ref.item(), rel=1e-3)
    for got, want in zip(*grads):
        assert got.dtype == want.dtype == torch.float32
        assert (got - want).abs().max() <= 1e-2 * want.abs().max()


def test_buffer_bias_gets_no_gradient():
    h, w, b, y = _case(N=100)
    out = linear_cross_entropy(h, w, b.detach(), y)
    out.backward()
    assert h.grad is not None and w.grad is not None and b.grad is None
