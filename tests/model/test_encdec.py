"""The encoder-decoder against naive recomputation: padding, causality, cached == full decoding,
batched == one at a time, beam search vs greedy and vs exhaustive search, and a small learning
check."""

import itertools

import pytest
import torch

from zerolm.config import ModelConfig
from zerolm.infer.sampling import SamplingParams
from zerolm.infer.seq2seq import Seq2SeqCache, generate, stream
from zerolm.model import build_model, load_model, save_model

V, BOS, EOS = 40, 1, 2
VARIANTS = {
    "transformer": dict(preset="transformer"),  # post-LN, ReLU, sinusoidal, scaled tied embeddings
    "gpt2": dict(arch="encdec", preset="gpt2"),  # pre-LN, GELU, learned positions, final norms
    "llama-gqa": dict(
        arch="encdec", preset="llama", n_kv_heads=2
    ),  # RMSNorm, SwiGLU, RoPE, untied head
    "bart-like": dict(
        preset="transformer",
        position="learned",
        embed_norm=True,
        embed_scale=False,
        ffn="gelu_erf",
        n_decoder_layers=3,
    ),
}
SOURCES = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [18]]
# random models mostly repeat one token; these re-initialisations (seed, linear gain, embedding std,
# eos bias) give varied outputs that stop both by eos and by length
SHARPEN = {"gpt2": (3, 3.0, 0.3, 1.0), "llama-gqa": (0, 3.0, 1.0, 0.0)}


def make(name, **over):
    kw = dict(d_model=32, n_layers=2, n_heads=4, max_seq_len=24) | VARIANTS[name] | over
    seed, gain, emb, eos_bias = SHARPEN.get(name, (0, 2.0, None, 1.0))
    model = build_model(ModelConfig(**kw), vocab_size=V, seed=seed).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
            elif "emb" not in name:
                p.normal_(0.0, gain / p.shape[1] ** 0.5, generator=gen)
            elif emb:
                p.normal_(0.0, emb, generator=gen)
        model.final_logits_bias.copy_(torch.randn(V, generator=gen))
        model.final_logits_bias[EOS] += eos_bias
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest, and steadiest on a busy 2-core machine, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reverser():
    """A ~50k-parameter transformer-preset model trained (300 Adam steps) to reverse 5 tokens of
    3..19."""
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(
            preset="transformer",
            d_model=48,
            n_layers=1,
            n_heads=4,
            d_ff=96,
            max_seq_len=12,
            dropout=0.0,
        ),
        vocab_size=V,
        seed=0,
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(300):
        src = torch.randint(3, 20, (64, 5), generator=gen)
        tgt = torch.cat([src.flip(1), torch.full((64, 1), EOS)], 1)  # reversed, then eos
        inp = torch.cat([torch.full((64, 1), BOS), tgt[:, :-1]], 1)
        loss = torch.nn.functional.cross_entropy(model(src, inp).flatten(0, 1), tgt.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.final_loss = loss.item()
    return model.eval()


def ids(B, T, seed):
    return torch.randint(3, V, (B, T), generator=torch.Generator().manual_seed(seed))


def full_recompute(model, src, n):
    """Greedy decoding by re-running the whole target each step (no cache)."""
    out = []
    with torch.no_grad():
        memory = model.encode(torch.tensor([src]))
        for _ in range(n):
            tgt = torch.tensor([[BOS] + out])
            out.append(int(model.logits(model.decode(tgt, memory))[0, -1].argmax()))
            if out[-1] == EOS:
                break
    return out


@pytest.mark.parametrize("name", VARIANTS)
def test_source_padding_never_changes_real_positions(name):
    model = make(name)
    src, tgt = ids(2, 9, 1), ids(2, 6, 2)
    padded = torch.cat([src, ids(2, 5, 3)], 1)  # five pad positions of arbitrary ids
    mask = torch.cat([torch.ones(2, 9), torch.zeros(2, 5)], 1)
    with torch.no_grad():
        close = dict(atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model.encode(padded, mask)[:, :9], model.encode(src), **close)
        torch.testing.assert_close(model(padded, tgt, mask), model(src, tgt), **close)
        mask_int = mask.long()  # 0/1 ints work as well as booleans
        torch.testing.assert_close(model(padded, tgt, mask_int), model(src, tgt), **close)


@pytest.mark.parametrize("name", ["transformer", "gpt2"])
def test_decoder_is_causal_and_encoder_bidirectional(name):
    model = make(name)
    src, tgt = ids(2, 8, 4), ids(2, 10, 5)
    with torch.no_grad():
        logits, memory = model(src, tgt), model.encode(src)
        for j in (3, 7):
            changed = tgt.clone()
            changed[:, j] = (changed[:, j] + 1) % V
            after = model(src, changed)
            assert torch.equal(after[:, :j], logits[:, :j])  # the past never sees the future
            assert not torch.allclose(after[:, j:], logits[:, j:])
        changed = src.clone()
        changed[:, 6] = (changed[:, 6] + 1) % V
        assert not torch.allclose(
            model.encode(changed)[:, 0], memory[:, 0]
        )  # position 0 sees position 6


@pytest.mark.parametrize("name", VARIANTS)
def test_cached_decoding_equals_full_recomputation(name):
    model = make(name)
    src, tgt = ids(2, 7, 6), ids(2, 12, 7)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    with torch.no_grad():
        memory = model.encode(src, mask)
        full = model.logits(model.decode(tgt, memory, mask))
        cache = Seq2SeqCache.for_model(model, 2, 12)
        parts = [
            model.logits(model.decode(tgt[:, a:b], memory if a == 0 else None, mask, cache=cache))
            for a, b in ((0, 5), (5, 6), (6, 7), (7, 12))
        ]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["transformer", "gpt2", "llama-gqa"])
def test_batched_cached_greedy_equals_one_at_a_time_and_full_recomputation(name, request):
    model = request.getfixturevalue("reverser") if name == "transformer" else make(name)
    kw = dict(bos=BOS, eos=EOS, max_new_tokens=10)
    batched = generate(model, SOURCES, **kw)
    assert batched == [generate(model, [s], **kw)[0] for s in SOURCES]
    assert batched == [full_recompute(model, s, 10) for s in SOURCES]
    assert len({tuple(r) for r in batched}) == len(SOURCES)
    if name != "transformer":  # rows leave the batch at different steps; some run to the limit
        assert any(r[-1] == EOS and len(r) < 10 for r in batched) and any(
            len(r) == 10 for r in batched
        )
    streamed = [[] for _ in SOURCES]
    for step in stream(model, SOURCES, **kw):
        for r, t in step.items():
            streamed[r].append(t)
    assert streamed == batched
    greedy = SamplingParams(temperature=0)
    assert generate(model, SOURCES, sampling=greedy, **kw) == batched


def test_sampling_is_seeded_and_differs_from_greedy():
    model = make("gpt2")
    kw = dict(
        bos=BOS, eos=EOS, max_new_tokens=12, sampling=SamplingParams(temperature=1.5, top_k=20)
    )
    a = generate(model, SOURCES, seed=3, **kw)
    assert a == generate(model, SOURCES, seed=3, **kw)
    assert a != generate(model, SOURCES, bos=BOS, eos=EOS, max_new_tokens=12)
    assert all(0 <= t < V for row in a for t in row) and all(EOS not in row[:-1] for row in a)
    pen = dict(
        bos=BOS,
        eos=EOS,
        max_new_tokens=12,
        sampling=SamplingParams(temperature=0, repetition_penalty=5.0),
    )
    assert all(
        len(set(row)) == len(row) for row in generate(model, [[5, 6, 7]], **pen)
    )  # repeats penalised away


def _score(model, src, out, lp):
    """sum log p(out | src) / len(out)**lp, by full recomputation."""
    with torch.no_grad():
        logp = torch.log_softmax(
            model(torch.tensor([src]), torch.tensor([[BOS] + out[:-1]]))[0].float(), -1
        )
    return float(logp[torch.arange(len(out)), torch.tensor(out)].sum()) / len(out) ** lp


@pytest.mark.parametrize("name", ["transformer", "gpt2", "llama-gqa"])
def test_beam_search_width_1_is_greedy_and_width_k_scores_at_least_greedy(name, request):
    model = request.getfixturevalue("reverser") if name == "transformer" else make(name)
    kw = dict(bos=BOS, eos=EOS, max_new_tokens=10)
    greedy = generate(model, SOURCES, **kw)
    assert generate(model, SOURCES, beam=1, **kw) == greedy
    assert generate(model, SOURCES, beam=1, length_penalty=0.0, **kw) == greedy
    beams = generate(model, SOURCES, beam=4, **kw)
    assert beams == [generate(model, [s], beam=4, **kw)[0] for s in SOURCES]  # batched == alone
    for s, g, b in zip(SOURCES, greedy, beams):
        assert _score(model, s, b, 1.0) >= _score(model, s, g, 1.0) - 1e-5
    if name != "transformer":  # the trained reverser is confident: its beams agree with greedy
        assert beams != greedy


def test_beam_search_equals_exhaustive_search_on_a_tiny_vocabulary():
    """Vocabulary 5 (eos = 2), 3 new tokens, no length normalisation: a beam of 36 prunes nothing,
    so it must find the best of all 1 + 4 + 16 eos-ended and 64 full-length hypotheses, where greedy
    and a beam of 2 can miss it."""
    model = build_model(
        ModelConfig(arch="encdec", preset="gpt2", d_model=16, n_layers=1, n_heads=2, max_seq_len=8),
        vocab_size=5,
        seed=3,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(25.0)  # peaked, source-dependent distributions
    n, sources = 3, [[3, 4, 3], [4], [0, 3]]
    hyps = [list(p) + [EOS] for m in range(n) for p in itertools.product([0, 1, 3, 4], repeat=m)]
    hyps += [list(p) for p in itertools.product([0, 1, 3, 4], repeat=n)]
    best = [max(hyps, key=lambda h: _score(model, src, h, 0.0)) for src in sources]
    kw = dict(bos=BOS, eos=EOS, max_new_tokens=n, length_penalty=0.0)
    assert generate(model, sources, beam=36, **kw) == best
    assert generate(model, sources, **kw) != best and generate(model, sources, beam=2, **kw) != best


def test_generate_runs_in_eval_mode_and_restores_the_mode():
    model = make("transformer")  # dropout 0.1
    kw = dict(bos=BOS, eos=EOS, max_new_tokens=8)
    expected = generate(model, SOURCES, **kw)
    model.train()
    assert generate(model, SOURCES, **kw) == expected and generate(model, SOURCES, beam=3, **kw)
    assert sum(len(step) for step in stream(model, SOURCES, **kw)) == sum(map(len, expected))
    assert model.training


def test_save_load_round_trip_keeps_final_logits_bias(tmp_path):
    model = make("transformer")
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert type(loaded).__name__ == "EncoderDecoder"
    src, tgt = ids(2, 5, 8), ids(2, 4, 9)
    with torch.no_grad():
        assert torch.equal(loaded(src, tgt), model(src, tgt))


def test_clear_errors():
    model = make("transformer")
    with pytest.raises(ValueError, match="source of 25 tokens exceeds the model's max_seq_len=24"):
        model.encode(ids(1, 25, 0))
    with pytest.raises(ValueError, match="target of 30 tokens exceeds"):
        model(ids(1, 5, 0), ids(1, 30, 0))
    with pytest.raises(ValueError, match="no real token"):
        model.encode(ids(2, 5, 0), torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]]))
    kw = dict(bos=BOS, eos=EOS, max_new_tokens=5)
    with pytest.raises(ValueError, match="source 1 has 25 tokens"):
        generate(model, [[3], [3] * 25], **kw)
    with pytest.raises(ValueError, match="max_new_tokens must be in"):
        generate(model, [[3]], bos=BOS, eos=EOS, max_new_tokens=25)
    with pytest.raises(ValueError, match="source 0 is empty"):
        generate(model, [[]], **kw)
    with pytest.raises(ValueError, match="beam search is deterministic"):
        generate(model, [[3]], beam=2, sampling=SamplingParams(temperature=1.0), **kw)
    with pytest.raises(ValueError, match="token ids must be in"):
        generate(model, [[3, V]], **kw)
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len"):
        Seq2SeqCache.for_model(model, 1, 25)
    decoder = build_model(
        ModelConfig(preset="gpt2", d_model=32, n_layers=1, n_heads=4), vocab_size=V
    )
    with pytest.raises(ValueError, match="needs an encoder-decoder model"):
        generate(decoder, [[3]], **kw)


def test_learns_to_reverse_sequences(reverser):
    """~50k parameters, 300 Adam steps: reversing 5 tokens reaches high greedy exact match."""
    assert 40_000 < sum(p.numel() for p in reverser.parameters()) < 60_000
    test = torch.randint(3, 20, (200, 5), generator=torch.Generator().manual_seed(99)).tolist()
    out = generate(reverser, test, bos=BOS, eos=EOS, max_new_tokens=6)
    exact = sum(o == s[::-1] + [EOS] for o, s in zip(out, test)) / len(test)
    print(f"reverse: final loss {reverser.final_loss:.3f}, greedy exact match {exact:.1%}")
    assert exact >= 0.9
