import logging

import pytest
import torch

from zerolm.config import ModelConfig
from zerolm.infer.engine import Engine, GenerateRequest
from zerolm.infer.sampling import SamplingParams
from zerolm.model import build_model

V = 89
GREEDY = SamplingParams(temperature=0)


def make(preset, **over):
    kw = dict(preset=preset, d_model=32, n_layers=2, n_heads=4, max_seq_len=40) | over
    return build_model(ModelConfig(**kw), vocab_size=V, seed=5).eval()


def full_recompute(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [3], [20, 21, 22, 23], [40, 41]]


@pytest.mark.parametrize(
    "preset, over",
    [
        ("simple", {}),
        ("gpt2", {}),
        ("llama", {"n_kv_heads": 2}),
        ("llama", {"sliding_window": 5}),
        ("gpt2", {"position": "sinusoidal"}),
    ],
)
def test_batched_cached_greedy_equals_one_at_a_time_and_full_recomputation(preset, over):
    model = make(preset, **over)
    req = GenerateRequest(max_new_tokens=12, sampling=GREEDY)
    engine = Engine(model)
    batched = engine.generate(PROMPTS, req)
    assert batched == [engine.generate([p], req)[0] for p in PROMPTS]
    assert batched == [full_recompute(model, p, 12) for p in PROMPTS]


def test_stream_yields_the_same_tokens():
    engine = Engine(make("llama"))
    req = GenerateRequest(max_new_tokens=6, sampling=GREEDY)
    steps = list(engine.stream(PROMPTS[:2], req))
    assert len(steps) == 6
    assert [[s[r] for s in steps] for r in range(2)] == engine.generate(PROMPTS[:2], req)


def test_stop_token_ends_a_row_only():
    model = make("gpt2")
    engine = Engine(model)
    free = engine.generate(PROMPTS, GenerateRequest(max_new_tokens=10, sampling=GREEDY))
    stop = free[0][3]
    out = engine.generate(
        PROMPTS, GenerateRequest(max_new_tokens=10, sampling=GREEDY, stop_token_ids=(stop,))
    )
    for row, ref in zip(out, free):
        cut = ref.index(stop) + 1 if stop in ref else len(ref)
        assert row == ref[:cut]


def test_seeded_sampling_is_reproducible():
    engine = Engine(make("llama"))
    req = GenerateRequest(
        max_new_tokens=15, sampling=SamplingParams(temperature=1.0, top_p=0.9), seed=123
    )
    a, b = engine.generate(PROMPTS, req), engine.generate(PROMPTS, req)
    assert a == b
    c = engine.generate(
        PROMPTS, GenerateRequest(max_new_tokens=15, sampling=req.sampling, seed=124)
    )
    assert a != c


def test_penalties_reach_the_sampler():
    engine = Engine(make("llama"))
    plain = engine.generate([[1, 2]], GenerateRequest(max_new_tokens=20, sampling=GREEDY))[0]
    assert len(set(plain)) < 20  # an untrained model repeats itself
    strong = SamplingParams(temperature=0, frequency_penalty=100.0)
    varied = engine.generate([[1, 2]], GenerateRequest(max_new_tokens=20, sampling=strong))[0]
    assert len(set(varied)) == 20


def test_context_policy(caplog):
    model = make("gpt2")
    engine = Engine(model)
    long = list(range(1, 38))  # 37 tokens; with 8 new tokens only 32 fit in max_seq_len=40
    req = GenerateRequest(max_new_tokens=8, sampling=GREEDY)
    with caplog.at_level(logging.WARNING):
        out = engine.generate([long], req)
    assert "keeping the last 32" in caplog.text
    assert out == engine.generate([long[-32:]], req)
    with pytest.raises(ValueError, match="only 32 fit in max_seq_len=40"):
        engine.generate([long], GenerateRequest(max_new_tokens=8, sampling=GREEDY, context="error"))
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1], []], req)
    with pytest.raises(ValueError, match="max_new_tokens must be in"):
        engine.generate([[1]], GenerateRequest(max_new_tokens=40))


@pytest.mark.parametrize(
    "preset, over", [("llama", {"n_kv_heads": 2, "sliding_window": 6}), ("gpt2", {})]
)
def test_cache_slots_join_and_leave_like_continuous_batching(preset, over):
    """Sequences enter free slots at different times, decode together at different lengths, and a
    finished slot is reused: every step's logits equal a full recomputation of that sequence
    alone."""
    from zerolm.infer.kv_cache import KVCache

    model = make(preset, **over)
    cache = KVCache.for_model(model, 3)
    seqs: dict[int, list[int]] = {}

    def prefill(slot, prompt):
        cache.reset(slot)
        seqs[slot] = list(prompt)
        return model(torch.tensor([prompt]), cache=cache, rows=torch.tensor([slot]))[0, -1]

    def check(slot, logits):
        full = model(torch.tensor([seqs[slot]]))[0, -1]
        assert torch.allclose(logits, full, atol=1e-5), (slot, len(seqs[slot]))

    def decode(slots):
        toks = [(7 * len(seqs[s]) + s) % V for s in slots]  # any next tokens
        for s, t in zip(slots, toks):
            seqs[s].append(t)
        out = model(torch.tensor(toks)[:, None], cache=cache, rows=torch.tensor(slots))[:, -1]
        for s, row in zip(slots, out):
            check(s, row)

    with torch.no_grad():
        check(0, prefill(0, [5, 6, 7, 8, 9]))
        for _ in range(3):
            decode([0])
        check(2, prefill(2, [30, 31]))
        for _ in range(4):
            decode([0, 2])
        check(0, prefill(0, [50, 51, 52]))  # slot 0 finished; a new sequence takes it
        check(1, prefill(1, [60]))
        for _ in range(5):
            decode([2, 0, 1])  # any order of slots
        assert cache.lengths == [8, 6, 11]
        with pytest.raises(ValueError, match="at one length"):
            model(torch.tensor([[1, 2], [3, 4]]), cache=cache, rows=torch.tensor([0, 1]))


@pytest.mark.slow  # two compiles per case
@pytest.mark.parametrize(
    "preset, over", [("llama", {"n_kv_heads": 2, "sliding_window": 6}), ("gpt2", {})]
)
@pytest.mark.slow
def test_compiled_decode_matches_eager_and_compiles_once_per_batch_size(
    preset, over, tmp_path, caplog
):
    """Engine(compile=True): the same greedy tokens and (within float reassociation) the same
    logits as eager decoding, for one prompt and a batch of mixed lengths; requests of other
    lengths, up to the whole window, reuse the program of their batch size (positions and the
    attended span are inputs of the exported step); a later engine on the same model loads the
    saved programs instead of compiling."""
    from zerolm.infer.kv_cache import KVCache
    from zerolm.transforms.layout import decode_layout

    model = decode_layout(make(preset, **over))
    eager, compiled = Engine(model), Engine(model, compile=True, program_dir=str(tmp_path))
    req = GenerateRequest(max_new_tokens=10, sampling=GREEDY)
    for prompts in ([PROMPTS[0]], PROMPTS):  # batch 1, then 4 rows at different lengths
        assert compiled.generate(prompts, req) == eager.generate(prompts, req)
    assert len(compiled._programs) == 2
    full = GenerateRequest(max_new_tokens=40 - len(PROMPTS[1]), sampling=GREEDY)  # to max_seq_len
    for prompts, r in (
        ([PROMPTS[2]], GenerateRequest(max_new_tokens=7, sampling=GREEDY)),
        (PROMPTS[::-1], req),
        ([PROMPTS[1]], full),
        ([[1, 2], [3, 4], [5, 6], [7, 8]], req),
    ):  # also 4 rows at one length
        assert compiled.generate(prompts, r) == eager.generate(prompts, r)
    assert len(compiled._programs) == 2  # nothing compiled for new lengths
    with torch.inference_mode():  # the logits themselves, and the cache written in place
        caches = [KVCache.for_model(model, 1) for _ in range(2)]
        for e, c in zip((eager, compiled), caches):
            e.prefill([PROMPTS[0]], c)
        ids = torch.tensor([[17]])
        torch.testing.assert_close(
            compiled.decode(ids, caches[1]), eager.decode(ids, caches[0]), atol=1e-4, rtol=1e-4
        )
        assert caches[0].lengths == caches[1].lengths == [len(PROMPTS[0]) + 1]
        torch.testing.assert_close(caches[1].k[1], caches[0].k[1], atol=1e-5, rtol=1e-5)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [
        ".json",
        ".json",
        ".pt2",
        ".pt2",
    ]  # programs, manifests
    with caplog.at_level(logging.INFO):
        again = Engine(model, compile=True, program_dir=str(tmp_path))
        assert again.generate(PROMPTS, req) == eager.generate(PROMPTS, req)
    assert "loaded the compiled decode step" in caplog.text and "compiling" not in caplog.text


@pytest.mark.slow
def test_compiled_engine_without_a_cpp_compiler_warns_and_decodes_eagerly(caplog, tmp_path):
    model = make("llama")
    req = GenerateRequest(max_new_tokens=8, sampling=GREEDY)
    engine = Engine(model, compile=True, program_dir=str(tmp_path))
    # probed (and cached for the process) with the real compiler first
    torch._inductor.cpu_vec_isa.pick_vec_isa()
    with (
        torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/c++",)}),
        caplog.at_level(logging.WARNING),
    ):
        out = engine.generate(PROMPTS[:2], req)
    assert out == Engine(model).generate(PROMPTS[:2], req)
    assert (
        not engine.compiled and "decoding eagerly" in caplog.text and "C++ compiler" in caplog.text
    )

    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


@pytest.mark.slow  # a compile
def test_a_damaged_saved_program_is_compiled_again(tmp_path, caplog):
    from zerolm.infer.compiled import program_key
    from zerolm.infer.kv_cache import KVCache

    model = make("gpt2")
    key = program_key(model, 1, KVCache.for_model(model, 1))
    (tmp_path / f"{key}.pt2").write_bytes(b"not a program")
    req = GenerateRequest(max_new_tokens=8, sampling=GREEDY)
    engine = Engine(model, compile=True, program_dir=str(tmp_path))
    with caplog.at_level(logging.INFO):
        assert engine.generate([PROMPTS[0]], req) == Engine(model).generate([PROMPTS[0]], req)
    assert "could not load" in caplog.text and engine.compiled and len(engine._programs) == 1
    assert (tmp_path / f"{key}.pt2").stat().st_size > 1000  # replaced by the real program
