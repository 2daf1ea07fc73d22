import copy

import pluggy
import pytest
import torch

import swiftk.contracts.hookspecs
from swiftk.contracts import lookup
from swiftk.plugins.optimizers.adafactor import adafactor
from swiftk.plugins.optimizers.bnb import adamw_8bit
from swiftk.plugins.optimizers.galore import galore_adamw


class TinyLlama(torch.nn.Module):
    """Parameter names as in a llama checkpoint: embed, one layer's attention and MLP, norm, head."""

    def __init__(self, dim: int = 8, vocab: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed_tokens = torch.nn.Embedding(vocab, dim)
        self.self_attn = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(dim, dim, bias=False)})
        self.mlp = torch.nn.ModuleDict({"up_proj": torch.nn.Linear(dim, 2 * dim),
                                        "down_proj": torch.nn.Linear(2 * dim, dim)})
        self.norm = torch.nn.LayerNorm(dim)
        self.lm_head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.self_attn["q_proj"](self.embed_tokens(ids))
        h = h + self.mlp["down_proj"](torch.relu(self.mlp["up_proj"](h)))
        return self.lm_head(self.norm(h))  # [B, T, V]


def groups(model: torch.nn.Module, weight_decay: float = 0.1) -> list[dict]:
    """The kernel's two groups: matrices decayed, vectors not, each naming its tensors."""
    named = list(model.named_parameters())
    return [{"params": [p for _, p in part], "names": [n for n, _ in part], "weight_decay": wd}
            for part, wd in (([x for x in named if x[1].dim() >= 2], weight_decay),
                             ([x for x in named if x[1].dim() < 2], 0.0))]


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    ids = torch.arange(12).reshape(2, 6) % model.lm_head.out_features
    loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.roll(1).flatten())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def test_adafactor_follows_the_external_lr() -> None:
    """relative_step=False: the kernel's (scheduled) lr drives the update, so lr 0 moves nothing."""
    for lr, moves in ((0.0, False), (1e-2, True)):
        model = TinyLlama()
        before = copy.deepcopy(model.state_dict())
        step(model, adafactor(groups(model), lr=lr))
        changed = [not torch.equal(before[k], v) for k, v in model.state_dict().items()]
        assert all(changed) if moves else not any(changed)


def test_adamw_8bit_keeps_8bit_moments_and_resumes_exactly() -> None:
    model = TinyLlama(dim=64, vocab=64)  # q_proj has 4096 weights, the least that gets 8-bit state
    twin = copy.deepcopy(model)
    optimizer = adamw_8bit(groups(model), lr=1e-2)
    q_proj = model.self_attn["q_proj"].weight
    before = q_proj.detach().clone()
    for _ in range(2):
        step(model, optimizer)
    assert not torch.equal(before, q_proj)
    assert optimizer.state[q_proj]["state1"].dtype == torch.uint8
    assert optimizer.state[model.norm.weight]["state1"].dtype == torch.float32
    resumed = adamw_8bit(groups(twin), lr=1e-2)
    twin.load_state_dict(model.state_dict())
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    step(model, optimizer)
    step(twin, resumed)
    torch.testing.assert_close(twin.state_dict(), model.state_dict(), rtol=0, atol=0)


def test_galore_projects_targeted_matrices_only() -> None:
    model = TinyLlama()
    optimizer = galore_adamw(groups(model), lr=1e-2, rank=2, update_proj_gap=2)
    projected = {n for g in optimizer.param_groups if "rank" in g for n in g["names"]}
    assert projected == {"self_attn.q_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"}
    assert {g["weight_decay"] for g in optimizer.param_groups if "rank" in g} == {0.1}
    assert {n: g["weight_decay"] for g in optimizer.param_groups for n in g["names"]}["mlp.up_proj.bias"] == 0.0


def test_galore_updates_in_a_low_rank_subspace() -> None:
    """Without weight decay, one step moves a projected [16, 8] matrix by a rank-2 update, a plain one by more."""
    model = TinyLlama()
    before = copy.deepcopy(model.state_dict())
    optimizer = galore_adamw(groups(model, weight_decay=0.0), lr=1e-2, rank=2)
    step(model, optimizer)
    delta = {k: v - before[k] for k, v in model.state_dict().items()}
    assert torch.linalg.matrix_rank(delta["mlp.up_proj.weight"], rtol=1e-4) == 2
    assert torch.linalg.matrix_rank(delta["lm_head.weight"], rtol=1e-4) == 8
    assert all(d.abs().sum() > 0 for d in delta.values())


def test_galore_refuses_an_unknown_projection() -> None:
    with pytest.raises(ValueError, match="proj_type"):
        galore_adamw(groups(TinyLlama()), lr=1e-2, proj_type="diagonal")


@pytest.mark.parametrize("name", ["adafactor", "adamw_8bit", "galore_adamw"])
def test_optimizers_build_through_the_hook(name: str) -> None:
    manager = pluggy.PluginManager("swiftk")
    manager.add_hookspecs(swiftk.contracts.hookspecs)
    manager.register(lookup("optimizer", name).build(), name=f"optimizer:{name}")
    model = TinyLlama()
    optimizer = manager.hook.swiftk_optimizer_build(param_groups=groups(model), lr=1e-3, model=model)
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3] * len(optimizer.param_groups)
