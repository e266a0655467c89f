import pytest
import torch

from zerolm.config import TrainConfig
from zerolm.eval.mode import eval_mode
from zerolm.train.batches import Stream
from zerolm.train.losses import lm_loss
from zerolm.train.trainer import Trainer


@pytest.fixture
def new_model(tiny_model):
    """A fresh one-layer llama per call (vocab 50, d_model 16, window 8)."""
    return lambda: tiny_model("llama", 50, d_model=16, n_layers=1, n_heads=2, max_seq_len=8)


def test_eval_mode_restores_the_mode_it_found_even_on_an_error(new_model):
    model = new_model().train()
    with eval_mode(model):
        assert not model.training and not any(m.training for m in model.modules())
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError
    assert not model.training


def test_the_trainer_takes_batches_with_a_state_and_says_how_to_wrap_an_iterator(
    tmp_path, new_model
):
    data = torch.randint(0, 50, (2, 9))
    batches = [(data[:, :-1], data[:, 1:])]
    with pytest.raises(TypeError, match="wrap a plain iterator in zerolm.train.batches.Stream"):
        Trainer(new_model(), TrainConfig(steps=1), tmp_path, batches=iter(batches), loss_fn=lm_loss)
    stream = Stream(batches)
    assert stream.state_dict() == {} and next(stream) is batches[0]
