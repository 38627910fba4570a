"""``index_prologue``: the Triton kernel equals the reference (norms, RoPE, Hadamard, casts, FP8 keys)."""

import pytest
import torch
import triton
import triton.language as tl

from keye_dsa import DSAttention, StaticDSACache
from keye_dsa.ops._triton_utils import round_to_bf16, round_to_e4m3
from keye_dsa.ops.index_prologue import index_prologue
from keye_dsa.ops.index_prologue.reference import index_prologue_reference
from keye_dsa.ops.indexer_topk.decode import dequantize_index_keys
from keye_dsa.rope import rope_cos_sin

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(b, t, h, d, dtype, seed, rotation="positions"):
    """``(q_all, k, q_norm_weight, k_norm_weight, k_norm_bias)`` and the rotation's keywords:
    ``"positions"`` ``[B,T]``, ``"mrope"`` ``[3,B,T]`` with sections, or ``"cos_sin"`` ready-made."""
    g = torch.Generator().manual_seed(seed)
    q_all = torch.randn(b, t, h * d + h, generator=g) * 3
    k = torch.randn(b, t, d, generator=g) * 2 + 0.5
    norms = (torch.rand(d, generator=g) + 0.5, torch.rand(d, generator=g) + 0.5, torch.randn(d, generator=g))
    tensors = tuple(x.to(dtype).to(DEVICE) for x in (q_all, k, *norms))
    if rotation == "mrope":  # three position rows, sections over d / 2 frequencies
        sec = [d // 4, d // 8, d // 2 - d // 4 - d // 8]
        pos = torch.randint(0, 300_000, (3, b, t), generator=g).to(DEVICE)
        return tensors, dict(position_ids=pos, rope_theta=1e6, sections=sec)
    pos = torch.randint(0, 300_000, (b, t), generator=g).to(DEVICE)
    if rotation == "cos_sin":
        return tensors, dict(rope=rope_cos_sin(pos, d, 5e5))
    return tensors, dict(position_ids=pos, rope_theta=1e6)


CASES = [  # batch, tokens, heads, dim, hadamard, fp8 keys, rotation
    (2, 3, 4, 32, False, False, "positions"),
    (1, 5, 3, 24, False, True, "mrope"),  # odd heads, dim not a power of two
    (2, 2, 4, 16, True, True, "cos_sin"),
    (3, 1, 4, 128, True, False, "mrope"),
    (4, 1, 4, 128, False, True, "positions"),
    (2, 2, 2, 64, False, False, "cos_sin"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_kernel_equals_reference(force_impl, dtype, case):
    """fp32: within 1e-5 relative (the kernel's sums run in another order); bf16: identical bits, since
    both round the same fp32 values once. FP8 keys: identical bytes and scales wherever the kernel's
    unquantized key equals the reference's (everywhere, for bf16), and within one e4m3 step elsewhere."""
    b, t, h, d, hadamard, fp8, rotation = case
    inputs, rotary = _inputs(b, t, h, d, dtype, seed=b * t * h + d, rotation=rotation)
    options = dict(num_heads=h, q_eps=1e-6, k_eps=1e-5, hadamard=hadamard, **rotary)
    want = index_prologue_reference(*inputs, out_dtype=dtype, fp8_keys=fp8, **options)
    force_impl("triton")
    got = index_prologue(*inputs, fp8_keys=fp8, **options)
    assert [None if x is None else (x.shape, x.dtype) for x in got] == [
        None if x is None else (x.shape, x.dtype) for x in want
    ]
    assert torch.equal(got[2], want[2]), "gates"
    plain_got = index_prologue(*inputs, **options)[1]
    plain_want = index_prologue_reference(*inputs, out_dtype=dtype, **options)[1]
    for name, g, w in (("q_index", got[0], want[0]), ("k_index", plain_got, plain_want)):
        if dtype == torch.bfloat16:  # the same fp32 values up to their order of sums: one rounding apart
            assert (g == w).float().mean() >= 0.99, name
            assert ((g.float() - w.float()).abs() <= w.float().abs() / 128).all(), name  # one ulp
        else:
            assert (g - w).abs().max() <= 1e-5 * w.abs().max(), name
    if fp8:
        deq_got, deq_want = dequantize_index_keys(got[1], got[3]), dequantize_index_keys(want[1], want[3])
        step = torch.maximum(deq_want.abs() / 8, want[3][..., None] / 512)  # one e4m3 step (or subnormal)
        assert ((deq_got - deq_want).abs() <= step * 1.001).all()
        # the same quantization: identical scales and bytes wherever the unquantized keys agree
        same = (plain_got == plain_want).all(-1)
        assert torch.equal(got[3][same], want[3][same]), "k_scale"
        assert torch.equal(got[1][same].float(), want[1][same].float()), "FP8 key bytes"
        if dtype == torch.bfloat16:
            assert same.float().mean() >= 0.5
        else:
            assert ((got[3] - want[3]).abs() <= 1e-5 * want[3]).all(), "k_scale"


@triton.jit
def _round_both(X, E4M3, BF16, N: tl.constexpr):
    i = tl.arange(0, N)
    x = tl.load(X + i)
    tl.store(E4M3 + i, round_to_e4m3(x).to(E4M3.dtype.element_ty))
    tl.store(BF16 + i, round_to_bf16(x).to(BF16.dtype.element_ty))


def test_rounding_helpers_match_torch_casts():
    """The kernel's roundings give torch's casts (ties to even, carries into the exponent, e4m3's
    subnormals), which the interpreter's own casts do not."""
    g = torch.Generator().manual_seed(0)
    n = 1 << 14
    x = torch.cat([(torch.rand(n, generator=g) * 2 - 1) * 448, torch.randn(n, generator=g) * 1e-2])
    edges = [448.0, -448.0, 0.0, 2**-6, 2**-7, 3 * 2**-10, 5 * 2**-10, 2**-10, 1.0625, 1.1875, 126.6, 2**-9]
    x = torch.cat([torch.tensor(edges), x])[: 2 * n].to(DEVICE)  # a power of two (tl.arange)
    e4m3 = torch.empty_like(x, dtype=torch.float8_e4m3fn)
    bf16 = torch.empty_like(x, dtype=torch.bfloat16)
    _round_both[(1,)](x, e4m3, bf16, N=x.numel())
    assert torch.equal(e4m3.float(), x.to(torch.float8_e4m3fn).float())  # -0.0 == 0.0: the interpreter
    assert torch.equal(bf16, x.to(torch.bfloat16))  # drops the sign of a zero e4m3


def test_positions_broadcast_over_the_batch(force_impl):
    """``position_ids [1, T]`` (as Hugging Face models pass them) rotate every row alike."""
    inputs, rotary = _inputs(3, 4, 2, 16, torch.float32, seed=3)
    one_row = rotary["position_ids"][:1]
    want = index_prologue_reference(*inputs, num_heads=2, q_eps=1e-6, k_eps=1e-6, out_dtype=torch.float32,
                                    position_ids=one_row.expand(3, 4), rope_theta=1e6)  # fmt: skip
    force_impl("triton")
    got = index_prologue(*inputs, num_heads=2, q_eps=1e-6, k_eps=1e-6, position_ids=one_row, rope_theta=1e6)
    assert (got[0] - want[0]).abs().max() <= 1e-5 * want[0].abs().max()
    assert (got[1] - want[1]).abs().max() <= 1e-5 * want[1].abs().max()


def test_autograd_takes_the_reference(force_impl):
    """With gradients wanted the reference runs (the kernel is forward only) and gradients flow."""
    force_impl("triton")
    inputs, rotary = _inputs(1, 2, 2, 16, torch.float32, seed=0)
    opts = dict(num_heads=2, q_eps=1e-6, k_eps=1e-6, **rotary)
    q_all, k = (x.clone().requires_grad_() for x in inputs[:2])
    q_i, k_i, w, _ = index_prologue(q_all, k, *inputs[2:], **opts)
    (q_i.square().sum() + k_i.square().sum() + w.sum()).backward()
    assert q_all.grad.abs().sum() > 0 and k.grad.abs().sum() > 0
    with torch.no_grad():  # the kernel's forward gives the same values
        fast = index_prologue(*inputs, **opts)
    assert (fast[0] - q_i).abs().max() <= 1e-5 and (fast[1] - k_i).abs().max() <= 1e-5


def _valid_args(d=16, rotation="cos_sin"):
    names = ("q_all", "k", "q_norm_weight", "k_norm_weight", "k_norm_bias")
    tensors, rotary = _inputs(1, 2, 2, d, torch.float32, seed=1, rotation=rotation)
    return dict(zip(names, tensors), num_heads=2, q_eps=1e-6, k_eps=1e-6, **rotary)


def _with_positions(args, shape):
    return {**args, "rope": None, "position_ids": torch.zeros(shape, dtype=torch.long), "rope_theta": 1e4}


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: {**a, "k": a["k"][..., :-2]}, "q_all.shape"),
        (lambda a: {**a, "k": a["k"][:, :1]}, "k.shape"),
        (lambda a: {**a, "q_all": a["q_all"][0]}, "q_all must have rank 3"),
        (lambda a: {**a, "rope": tuple(x[..., :8] for x in a["rope"])}, "cos must broadcast"),
        (lambda a: {**a, "rope": (a["rope"][0], a["rope"][1][None])}, "sin must broadcast"),
        (lambda a: {**a, "k_norm_bias": a["k_norm_bias"][:4]}, "k_norm_bias.shape"),
        (lambda a: {**a, "k": a["k"].to(torch.int32)}, "k must be a floating tensor"),
        (lambda a: {**a, "position_ids": torch.zeros(1, 2, dtype=torch.long)}, "not both"),
        (lambda a: {**a, "rope": None}, "not both"),
        (lambda a: _with_positions(a, (1, 3)), "position_ids must be integer"),
        (lambda a: _with_positions(a, (2, 2)), "position_ids must be integer"),
        (lambda a: _with_positions(a, (3, 1, 2)), "3 mrope sections"),
        (lambda a: {**a, "rope": None, "position_ids": torch.zeros(1, 2, dtype=torch.long)}, "rope_theta"),
        (lambda a: {**a, "hadamard": True}, None),  # valid: 16 is a power of two
    ],
)
def test_bad_inputs_are_named(change, match):
    args = change(_valid_args())
    args = {n: x.to(DEVICE) if isinstance(x, torch.Tensor) else x for n, x in args.items()}
    if match is None:
        index_prologue(**args)
        return
    with pytest.raises((ValueError, TypeError), match=match):
        index_prologue(**args)


def test_hadamard_needs_a_power_of_two():
    with pytest.raises(ValueError, match="power-of-two index_dim"):
        index_prologue(**_valid_args(d=24), hadamard=True)


def test_decode_step_writes_the_same_cache(force_impl, monkeypatch):
    """A bf16 DSAttention's prefill and decode steps on an FP8 static cache: with the kernel prologue the
    cache holds the same index keys and scales, and the steps give the same output, as with the
    reference prologue (every other op runs the same kernels in both)."""
    from keye_dsa.modules import indexer as indexer_module

    force_impl("triton")
    torch.manual_seed(0)
    attn = DSAttention(64, 4, 2, 16, index_heads=2, index_head_dim=16, topk=8)
    attn = attn.to(DEVICE, torch.bfloat16).eval()
    x = torch.randn(2, 20, 64, device=DEVICE, dtype=torch.bfloat16)
    outs, caches = [], []
    for prologue in (index_prologue_reference, index_prologue):
        monkeypatch.setattr(indexer_module, "index_prologue", prologue)
        cache = StaticDSACache(2, 32, index_dtype=torch.float8_e4m3fn)
        with torch.no_grad():
            attn(x[:, :18], cache=cache)
            outs.append(torch.cat([attn(x[:, i : i + 1], cache=cache) for i in (18, 19)], 1))
        caches.append(cache.layer(0))
    assert torch.equal(caches[0]["k_index_scale"], caches[1]["k_index_scale"])
    assert torch.equal(caches[0]["k_index"].float(), caches[1]["k_index"].float())
    assert torch.equal(outs[0], outs[1])
