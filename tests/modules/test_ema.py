import torch
from torch import nn

from ldm.modules.ema import LitEma


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.diffusion_model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_buffer_names_follow_sd_checkpoints():
    ema = LitEma(Wrapper())
    assert set(ema.state_dict()) == {
        "decay", "num_updates",
        "diffusion_model0weight", "diffusion_model0bias", "diffusion_model2weight", "diffusion_model2bias",
    }
    assert ema.num_updates.dtype == torch.int32


def test_update_matches_the_formula_with_warmup():
    model = Wrapper()
    ema = LitEma(model, decay=0.9)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema(model)  # n=0: d = min(0.9, 1/10) = 0.1
    for n, p in model.named_parameters():
        expected = start[n] + (1 - 0.1) * (p - start[n])
        assert torch.allclose(getattr(ema, n.replace(".", "")), expected, atol=1e-6)
    assert ema.num_updates.item() == 1


def test_swapped_in_restores_trained_weights():
    model = Wrapper()
    ema = LitEma(model)
    trained = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for s in ema.buffers():
            if s.dtype.is_floating_point and s.dim() > 0:
                s.fill_(7.0)
    with ema.swapped_in(model):
        assert all(torch.all(p == 7.0) for p in model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), trained))
