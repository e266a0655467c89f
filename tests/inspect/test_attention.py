import pytest
import torch

from zerolm.config import ModelConfig
from zerolm.inspect.attention import attention_weights
from zerolm.model import build_model


@pytest.mark.parametrize(
    "over",
    [
        dict(preset="llama", n_kv_heads=2),
        dict(preset="llama", sliding_window=4),
        dict(preset="gpt2"),
    ],
)
def test_weights_times_values_give_the_layers_attention_output(over):
    """(weights @ V) through the output projection equals what the attention module computed."""
    model = build_model(
        ModelConfig(d_model=32, n_layers=2, n_heads=4, max_seq_len=32, **over),
        vocab_size=50,
        seed=1,
    ).eval()
    ids = torch.randint(0, 50, (11,), generator=torch.Generator().manual_seed(0)).tolist()
    attn = model.blocks[1].attn
    seen = {}
    h1 = attn.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    h2 = attn.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out))
    with torch.no_grad():
        model(torch.tensor([ids]))
    h1.remove(), h2.remove()
    w = attention_weights(model, ids, layer=1)  # (H, T, T)
    T = len(ids)
    assert w.shape == (4, T, T)
    assert torch.allclose(w.sum(-1), torch.ones(4, T), atol=1e-6)
    assert torch.all(w.triu(1) == 0)  # causal
    if model.cfg.sliding_window:
        assert torch.all(w.tril(-model.cfg.sliding_window) == 0)
    with torch.no_grad():
        v = (
            attn.v(seen["x"])
            .view(1, T, attn.kv, attn.dh)
            .transpose(1, 2)
            .repeat_interleave(attn.h // attn.kv, 1)
        )
        y = (w[None] @ v).transpose(1, 2).reshape(1, T, -1)
        assert torch.allclose(attn.o(y), seen["out"], atol=1e-5)
    with pytest.raises(ValueError, match="layer must be"):
        attention_weights(model, ids, layer=2)
