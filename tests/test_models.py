"""`--model mlp:W,W | cnn | resnet18` in plain torch: sizes, seeding, state, real-size gossip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from runtimes import run_two
from test_images import write_digit_pngs

from fltasks import TaskError
from fltasks.images import imagefolder_task
from fltasks.models import ModelSpec, build_model, parse_model
from topologies.batched import make_trainer

pytestmark = pytest.mark.integration

torch.set_num_threads(1)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_resnet18_has_torchvisions_11181642_parameters_for_10_classes() -> None:
    model = build_model(parse_model("resnet18"), (3, 32, 32), 10, seed=0)
    assert _count(model) == 11_181_642
    # torchvision's 1000-class figure, from the same code: 11,689,512.
    assert _count(build_model(parse_model("resnet18"), (3, 224, 224), 1000, seed=0)) == 11_689_512
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet18_layers_match_torchvisions_names_and_shapes() -> None:
    state = build_model(parse_model("resnet18"), (3, 32, 32), 10, seed=0).state_dict()
    assert state["conv1.weight"].shape == (64, 3, 7, 7)
    assert state["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert state["layer4.1.conv2.weight"].shape == (512, 512, 3, 3)
    assert state["fc.weight"].shape == (10, 512)
    assert sum(1 for name in state if name.endswith("conv1.weight")) == 9  # stem + 8 blocks


@pytest.mark.parametrize("spec", ["mlp:32,16", "cnn", "resnet18"])
def test_same_spec_and_seed_give_the_same_initial_weights(spec: str) -> None:
    first, second = (build_model(parse_model(spec), (3, 16, 16), 10, seed=7) for _ in range(2))
    other = build_model(parse_model(spec), (3, 16, 16), 10, seed=8)
    pairs = list(zip(first.state_dict().values(), second.state_dict().values(), strict=True))
    assert all(torch.equal(a, b) for a, b in pairs)
    assert not torch.equal(next(first.parameters()), next(other.parameters()))


def test_building_a_model_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    build_model(parse_model("cnn"), (3, 8, 8), 10, seed=0)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("spec", ["cnn", "resnet18"])
def test_batchnorm_keeps_no_buffers_so_the_state_is_the_parameters(spec: str) -> None:
    """What the daemon gossips (state_dict) is what the simulator stacks (parameters)."""
    model = build_model(parse_model(spec), (3, 16, 16), 10, seed=0)
    assert list(model.state_dict()) == [name for name, _ in model.named_parameters()]
    assert all(t.dtype == torch.float32 for t in model.state_dict().values())
    # Evaluation normalises with the batch's own statistics, as training does.
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model.train()(x), model.eval()(x))


def test_cnn_is_the_1m_parameter_model_at_32x32() -> None:
    assert _count(build_model(parse_model("cnn"), (3, 32, 32), 10, seed=0)) == 1_070_986


@pytest.mark.parametrize(
    "text, expected",
    [("mlp:128,64", ModelSpec("mlp", (128, 64))), ("cnn", ModelSpec("cnn")),
     (" resnet18 ", ModelSpec("resnet18"))],
)
def test_parse_model_accepts_documented_forms(text: str, expected: ModelSpec) -> None:
    assert parse_model(text) == expected
    assert parse_model(str(expected)) == expected


@pytest.mark.parametrize("text", ["mlp", "mlp:", "mlp:a", "mlp:0", "cnn:3", "vgg16", ""])
def test_parse_model_rejects_bad_specs_with_one_line(text: str) -> None:
    with pytest.raises(TaskError, match="choose mlp:W,W") as info:
        parse_model(text)
    assert "\n" not in str(info.value)


def test_simulator_trains_a_batchnorm_model_per_node(tmp_path: Path) -> None:
    """The simulator's vmap trainer takes the same ResNet-18 (no shared BN buffers to write)."""
    root = write_digit_pngs(tmp_path / "digits", per_class=6)
    task = imagefolder_task(root, seed=0, model="resnet18", size=8)
    trainer = make_trainer(task)
    start = trainer.layout.flatten(task.make_model())
    flat = start.unsqueeze(0).repeat(2, 1)
    from topologies.batched import PaddedShards

    shards = PaddedShards([np.arange(0, 20), np.arange(20, len(task.y_train))])
    trainer.train(flat, shards, 1, torch.Generator().manual_seed(0))
    assert torch.isfinite(flat).all()
    assert not torch.equal(flat[0], start) and not torch.equal(flat[0], flat[1])


async def test_two_runtimes_gossip_a_1m_parameter_cnn(tmp_path: Path) -> None:
    """Real libp2p on loopback, 4.3 MB raw updates: both accept each other's model."""
    root = write_digit_pngs(tmp_path / "digits", per_class=12)
    task = imagefolder_task(root, seed=0)
    assert task.num_parameters() == 1_070_986
    # Pushes run in the background: a node that stopped right after its last round
    # could leave before its peer's 4.3 MB push arrived, so both serve a while (linger).
    first, second = await run_two(
        (task, task), (tmp_path / "a", tmp_path / "b"), ("0/2", "1/2"),
        rounds=2, round_interval=0.2, linger=10.0,
    )
    for me, other in ((first, second), (second, first)):
        status = me.status()
        assert status["round"] == 2
        assert status["updates_accepted"] >= 1 and status["updates_rejected"] == {}
        assert other.key.peer_id in status["last_seq"]
        assert me.gossip.layout.size == 1_070_986  # every parameter travels
        # Each round's phases are timed; what arrived was admitted in some round.
        phases = me.status()["phases"]
        last = phases["last_round"]
        assert last["round"] == 2 and last["round_s"] > 0
        # (the last round may be a serving one, with no training: count since start)
        totals = me.phases.totals
        assert totals["train"] > 0 and totals["prepare"] > 0 and totals["checkpoint"] > 0
        assert 0 < last["overhead_fraction"] <= 1  # 1 in a serving round
        # Pushes and admits run in the background, so they are counted when they end.
        assert me.phases.totals["send"] > 0 and me.phases.totals["admit"] > 0
        # The model (4.3 MB) and its copies are resident at least once.
        assert phases["peak_rss_mb"] > 4
