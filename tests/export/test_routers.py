import pytest
import torch

from dyvte_rt.errors import DyvteError
from export.reference import Router, RouterBank


def router_parameters(hidden: int, width: int) -> int:
    return (2 * hidden + 1) * width + (width + 1) * 2 if width else (2 * hidden + 1) * 2


@pytest.mark.parametrize("width", [0, 16, 2048])
def test_router_size_follows_width(width):
    assert sum(p.numel() for p in Router(32, width).parameters()) == router_parameters(32, width)


def test_paper_router_is_expressible_and_costs_537m_for_llava_7b():
    with torch.device("meta"):  # the real modules, without allocating 2 GB of weights
        bank = RouterBank(hidden=4096, layers=range(32), width=2048)
    assert bank.num_parameters() == pytest.approx(537e6, rel=1e-3)
    assert [tuple(p.shape) for p in bank.routers["0"].parameters()] == [
        (2048, 8192),
        (2048,),
        (2, 2048),
        (2,),
    ]


def test_router_bank_round_trips_through_safetensors(tmp_path):
    bank = RouterBank(hidden=16, layers=[3, 1, 2], width=8, threshold=0.7)
    path = tmp_path / "routers.safetensors"
    bank.save(path)
    again = RouterBank.load(path)
    assert (again.layers, again.width, again.threshold, again.hidden) == ((1, 2, 3), 8, 0.7, 16)
    features = torch.randn(1, 32)
    assert torch.equal(bank.logits(2, features), again.logits(2, features))


def test_loading_a_foreign_file_is_a_clear_error(tmp_path):
    path = tmp_path / "routers.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(DyvteError, match="routers"):
        RouterBank.load(path)
    with pytest.raises(DyvteError):
        RouterBank.load(tmp_path / "missing.safetensors")
