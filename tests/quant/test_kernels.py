"""The C++ quantized-linear op (torch.ops.zerolm.qlinear) against the float reference and the
pure-torch path: int8 / int4 sym / int4 asym, groups 32/64/128/row, odd shapes, batches through
both the small-M and the large-M paths, bias, QuantLinear modules, and a quantized tiny model's
greedy tokens and KV-cache decode. Tests of the op skip when it cannot be built here."""

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from zerolm.config import QuantConfig
from zerolm.infer.engine import Engine, GenerateRequest
from zerolm.infer.sampling import SamplingParams
from zerolm.quant import build, formats, kernels
from zerolm.quant.linear import QuantLinear, QuantSpec
from zerolm.transforms.quantize import quantize_model

FORMATS = [(8, "sym"), (4, "sym"), (4, "asym")]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def op():
    """The op, built into the user cache if need be (a minute the first time), else a skip."""
    try:
        built = build.build()
    except RuntimeError as e:
        pytest.skip(f"the quantized kernel does not build here: {str(e)[:200]}")
    if built is None or not kernels.load():
        pytest.skip("no C++ compiler, or ZEROLM_KERNELS=0: the quantized kernel is not loaded")
    return torch.ops.zerolm.qlinear


def _bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """|Q(x) @ W.T - x @ W.T| per output: each x value moves by at most half its block's step,
    absmax / 254 (1/254 of the block's largest value), so a row of W errs by at most
    sum over blocks of absmax_b / 254 * ||W[n, b]||_1; plus float32 summation slack."""
    k = x.shape[-1]
    amax = x.double().reshape(-1, k // 32, 32).abs().amax(-1)  # (M, nb)
    wl1 = w.double().abs().reshape(w.shape[0], k // 32, 32).sum(-1)  # (N, nb)
    slack = 1e-5 * (x.double().abs().reshape(-1, k) @ w.double().abs().T)
    return (amax / 254) @ wl1.T + slack  # (M, N)


@pytest.mark.parametrize("bits,scheme", FORMATS)
@pytest.mark.parametrize("group", [32, 64, 128, 0])
@pytest.mark.parametrize("m", [1, 3, 8, 67])  # 67: the large-M (dequantize + at::mm) path
def test_op_matches_the_float_reference_within_the_activation_rounding_bound(
    op, bits, scheme, group, m
):
    g = torch.Generator().manual_seed(m * 10 + bits + group)
    n, k = 37, 256  # odd N: a tile of 4 rows plus a 1-row tail
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    bias = torch.randn(n, generator=g)
    q = formats.quantize(w, bits, group, scheme)
    wd = formats.dequantize(q, bits)
    got = op(x, q.qweight, q.scales, q.mins, bits, group, bias).double()
    ref = x.double() @ wd.double().T + bias.double()
    assert ((got - ref).abs() <= _bound(x, wd)).all()
    assert (got - ref).abs().max() > 0  # x really is rounded to int8
    # the pure-torch path computes the same Q(x): equal up to float summation order
    with kernels.path("torch"):
        emul = kernels.linear(x, *q, bits, bias).double()
    torch.testing.assert_close(got, emul, rtol=0, atol=2e-5 * float(ref.abs().max()))
    # int16 scales (QuantLinear's buffers) are read as the float16 bits they hold
    q16 = (
        q.qweight,
        q.scales.view(torch.int16),
        None if q.mins is None else q.mins.view(torch.int16),
    )
    assert torch.equal(op(x, *q16, bits, group, bias), got.float())


@pytest.mark.parametrize("bits,scheme", FORMATS)
def test_leading_dims_bf16_and_odd_block_counts(op, bits, scheme):
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(2, 5, 96, generator=g), torch.randn(19, 96, generator=g)  # 3 blocks
    q = formats.quantize(w, bits, 32, scheme)
    got = op(x, q.qweight, q.scales, q.mins, bits, 32, None)
    assert got.shape == (2, 5, 19) and got.dtype == torch.float32
    flat = op(x.reshape(10, 96), q.qweight, q.scales, q.mins, bits, 32, None)
    assert torch.equal(got.reshape(10, 19), flat)
    with kernels.path("torch"):
        emul = kernels.linear(x, *q, bits)
    torch.testing.assert_close(got, emul, rtol=0, atol=1e-5 * float(emul.abs().max()))
    xb = x.bfloat16()
    with kernels.path("op"):
        yb = kernels.linear(xb, *q, bits)
    assert yb.dtype == torch.bfloat16  # kernels.linear answers in x's dtype
    assert torch.equal(yb, op(xb, q.qweight, q.scales, q.mins, bits, 32, None).bfloat16())


def test_bad_groups_and_shapes_are_clear_errors(op):
    with pytest.raises(ValueError, match="groups of 64 do not divide"):
        formats.quantize(torch.randn(4, 96), 4, 64)
    q = formats.quantize(torch.randn(4, 128), 8, 64)
    with pytest.raises(RuntimeError, match="group 32 but scales give 64"):
        op(torch.randn(1, 128), q.qweight, q.scales, None, 8, 32, None)
    with pytest.raises(RuntimeError, match="do not match x's 64 inputs"):
        op(torch.randn(1, 64), q.qweight, q.scales[:, :1], None, 8, 0, None)
    with pytest.raises(RuntimeError, match="bits must be 8 or 4"):
        op(torch.randn(1, 128), q.qweight, q.scales, None, 2, 64, None)


def test_meta_impl_traces_under_torch_export(op):
    q = formats.quantize(torch.randn(24, 64), 4, 32, "asym")
    layer = QuantLinear.from_quantized(q, QuantSpec(4, 32, "asym"), 64, torch.randn(24))
    with torch.device("meta"):
        y = op(torch.empty(3, 7, 64), q.qweight.to("meta"), q.scales.to("meta"), None, 4, 32, None)
    assert y.shape == (3, 7, 24) and y.device.type == "meta"
    with torch.no_grad():
        prog = torch.export.export(layer, (torch.randn(2, 64),))
        assert any("zerolm.qlinear" in str(n.target) for n in prog.graph.nodes)
        x = torch.randn(2, 64)
        assert torch.equal(prog.module()(x), layer(x))


@pytest.mark.parametrize("bits,scheme", FORMATS)
def test_quant_linear_forward_through_the_op_equals_the_torch_path(op, bits, scheme):
    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(160, 45, bias=True)
    spec = QuantSpec(bits, 32, scheme)
    q = formats.quantize(lin.weight.detach(), bits, 32, scheme)
    layer = QuantLinear.from_quantized(q, spec, 160, lin.bias)
    x = torch.randn(2, 3, 160, generator=g)
    with torch.no_grad():
        with kernels.path("op"):
            fast = layer(x)
        with kernels.path("torch"):
            slow = layer(x)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5 * float(slow.abs().max()))
    # a gradient through x takes the differentiable float path, whatever path is forced
    xg = x.clone().requires_grad_()
    with kernels.path("op"):
        layer(xg).sum().backward()
    assert torch.allclose(xg.grad, layer.weight.sum(0).expand_as(x), atol=1e-4)


@pytest.fixture(scope="module")
def counter(tiny_model):
    """A seeded tiny llama trained (150 steps, ~3 s) to count: the token after t is t + 1 mod 64.
    Its top logit leads the next by ~8, while int4 moves logits by < 0.5: greedy cannot flip."""
    m = tiny_model("llama", 64, seed=0, max_seq_len=32, n_kv_heads=2)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(150):
        seq = (torch.randint(0, 64, (16, 1), generator=g) + torch.arange(17)) % 64
        loss = F.cross_entropy(m(seq[:, :-1]).reshape(-1, 64), seq[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


@pytest.mark.parametrize("method,scheme", [("int8", "sym"), ("int4", "sym"), ("int4", "asym")])
def test_quantized_model_gives_fp32s_greedy_tokens_on_every_path(op, counter, method, scheme):
    q = quantize_model(copy.deepcopy(counter), QuantConfig(method=method, scheme=scheme, group=32))
    prompts = [[5, 6, 7, 8], [3], [60, 61, 62]]
    with torch.no_grad():  # the fixture's margin really is large against the quantization error
        ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
        f, top = counter(ids), counter(ids).topk(2, -1).values
        assert (top[..., 0] - top[..., 1]).min() > 10 * (q(ids) - f).abs().max()
    req = GenerateRequest(max_new_tokens=8, sampling=SamplingParams(temperature=0))
    want = Engine(counter).generate(prompts, req)
    assert want[0] == list(range(9, 17))  # it counts
    for which in ("op", "torch"):
        with kernels.path(which):
            assert Engine(q).generate(prompts, req) == want
    # the KV-cache decode (above) equals full recomputation of each prefix through the op
    with torch.no_grad(), kernels.path("op"):
        for prompt, got in zip(prompts, want):
            seq = list(prompt)
            for _ in range(8):
                seq.append(int(q(torch.tensor([seq]))[0, -1].argmax()))
            assert seq[len(prompt) :] == got
        # and its logits equal the torch path's up to float summation order
        with kernels.path("torch"):
            slow = q(ids)
        fast = q(ids)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-4)


def test_build_into_a_fresh_cache_and_self_check(tmp_path):
    """The build itself, from scratch, in its own process (one library per process)."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "PYTHONPATH": ROOT}
    if build.compiler() is None:
        pytest.skip("no C++ compiler here")
    res = subprocess.run(
        [sys.executable, "-m", "zerolm.quant.build"], env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-2000:]
    path, check = res.stdout.splitlines()[:2]
    assert path.startswith(str(tmp_path / "zerolm" / "kernels")) and path.endswith("qlinear.so")
    assert check.startswith("self-check: ok"), check
    files = [p for p in (tmp_path / "zerolm" / "kernels").rglob("*") if p.is_file()]
    assert [p.name for p in files] == ["qlinear.so"]  # the temporary file was renamed into place


@pytest.mark.parametrize("bits,scheme", FORMATS)
@pytest.mark.parametrize("group", [32, 64, 0])
@pytest.mark.parametrize("m", [1, 3, 8, 67])  # 67: 16 rows of 4 and a row of 3
def test_packed_op_equals_the_plain_op(op, bits, scheme, group, m):
    """The decode layout's kernel: the same Q(x) products as the plain op, up to summation order,
    for a partial last tile (37 rows: 2 tiles of 16 and 5), every group and batches of x."""
    g = torch.Generator().manual_seed(m + bits + group)
    n, k = 37, 256
    x, w, bias = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n)
    q = formats.quantize(w, bits, group, scheme)
    p = kernels.pack(q, bits)
    assert p.codes.shape == (3, k // 32, 16 * 32 * bits // 8) and p.scales.shape[::2] == (3, 16)
    plain = op(x, *q, bits, group, bias)
    got = torch.ops.zerolm.qlinear_packed(x, *p, bits, n, bias)
    torch.testing.assert_close(got, plain, rtol=0, atol=2e-6 * float(plain.abs().max()))
    with kernels.path("op"):  # kernels.linear takes it when a Packed is given
        assert torch.equal(kernels.linear(x, *q, bits, bias, p), got)
    with pytest.raises(RuntimeError, match="packed codes do not match 60 rows"):
        torch.ops.zerolm.qlinear_packed(x, *p, bits, 60, None)


def test_pack_is_the_documented_byte_permutation():
    """Lane r of vector v of tile t's block b: int8 w[16t + r, 32b + 4v + i] + 128; int4 the
    GGUF bytes 4v + i of row 16t + r's block b (checked on random codes, position by position)."""
    g = torch.Generator().manual_seed(0)
    q8 = formats.quantize(torch.randn(20, 64, generator=g), 8, 32)
    q4 = formats.quantize(torch.randn(20, 64, generator=g), 4, 32)
    p8, p4 = kernels.pack(q8, 8), kernels.pack(q4, 4)
    for t, b, v, r, i in [(0, 0, 0, 0, 0), (0, 1, 7, 15, 3), (1, 1, 3, 3, 2), (1, 0, 5, 2, 1)]:
        byte = p8.codes[t, b, 64 * v + 4 * r + i]
        assert int(byte) == int(q8.qweight[16 * t + r, 32 * b + 4 * v + i]) + 128
        if v < 4:
            byte = p4.codes[t, b, 64 * v + 4 * r + i]
            assert int(byte) == int(q4.qweight[16 * t + r, 16 * b + 4 * v + i])
    assert int(p8.codes[1, 0, 4 * 5]) == 128  # row 21: padding, code 0
    s = q4.scales.view(torch.int16)
    assert torch.equal(p4.scales[1, 1, :4], s[16:20, 1]) and not p4.scales[1, :, 4:].any()


def test_packed_copy_follows_the_codes_and_stays_out_of_the_state_dict(op):
    q = formats.quantize(torch.randn(24, 64), 4, 32)
    layer = QuantLinear.from_quantized(q, QuantSpec(4, 32, "sym"), 64)
    keys = list(layer.state_dict())
    layer.pack()
    assert layer.packed_codes is not None and list(layer.state_dict()) == keys
    x = torch.randn(2, 64)
    with torch.no_grad(), kernels.path("op"):
        packed = layer(x)
        layer.unpack()
        torch.testing.assert_close(packed, layer(x), rtol=0, atol=1e-5)
        layer.pack()
        other = formats.quantize(torch.randn(24, 64), 4, 32)
        layer.load_state_dict(QuantLinear.from_quantized(other, layer.spec, 64).state_dict())
        assert layer.packed_codes is None  # stale codes are dropped, never used
        layer.pack()
        layer.set_quantized(q)
        assert layer.packed_codes is None


@pytest.mark.slow
def test_portable_build_without_vnni_gives_the_same_products(tmp_path):
    """ZEROLM_MARCH=x86-64-v3 (AVX2, no AVX-512): the op's plain C++ loops, both layouts, against
    the torch path, in a process of its own (one library per process)."""
    if build.compiler() is None or os.uname().machine != "x86_64":
        pytest.skip("needs g++ on x86-64")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "PYTHONPATH": ROOT}
    script = (
        "import torch\n"
        "from zerolm.quant import build, formats, kernels\n"
        "assert '-march=x86-64-v3' in build.FLAGS; build.build(); assert kernels.load()\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x, w = torch.randn(5, 128, generator=g), torch.randn(21, 128, generator=g)\n"
        "worst = 0.0\n"
        "for bits, scheme, group in ((8, 'sym', 32), (4, 'sym', 64), (4, 'asym', 32)):\n"
        "    q = formats.quantize(w, bits, group, scheme)\n"
        "    with kernels.path('torch'):\n"
        "        want = kernels.linear(x, *q, bits)\n"
        "    with kernels.path('op'):\n"
        "        for p in (None, kernels.pack(q, bits)):\n"
        "            got = kernels.linear(x, *q, bits, None, p)\n"
        "            worst = max(worst, float((got - want).abs().max() / want.abs().max()))\n"
        "print(worst)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", script],
        env={**env, "ZEROLM_MARCH": "x86-64-v3"},
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert float(res.stdout.split()[-1]) < 1e-5
