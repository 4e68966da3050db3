"""dsd.DSD, the recipe driver for any training loop: phases at the right steps, exact sparsity, re-dense at a
tenth of the LR, iterative DSD and IHT, exact resume; and the README's quick start, run as written."""

import re

import pytest
import torch
from conftest import REPO
from torch import nn

import dsd

STEPS = 5  # per epoch
RECIPE = [
    {"kind": "dense", "epochs": 2, "lr": 0.1},
    {"kind": "sparse", "epochs": 2, "lr": 0.05, "sparsity": 0.5},
    {"kind": "redense", "epochs": 1},
    {"kind": "sparse", "epochs": 1, "lr": 0.02, "sparsity": 0.25},
    {"kind": "redense", "epochs": 1},
]


def make():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    return model, torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9, weight_decay=1e-3)


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 8, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(n)]


def run(model, optimizer, driver, data, log=None):
    for x, y in data:
        if driver.done:
            break
        if log is not None:
            log.append((driver.phase.name, driver.lr, driver.sparsity()))
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        driver.step()


def test_phases_lrs_and_masks_follow_the_recipe():
    model, optimizer = make()
    driver = dsd.DSD(model, optimizer, RECIPE, steps_per_epoch=STEPS, exclude=["0.weight"])
    log = []
    run(model, optimizer, driver, batches(100), log)
    assert driver.done and driver.global_step == 35
    names = [name for name, _, _ in log]
    assert names == ["dense"] * 10 + ["sparse1"] * 10 + ["redense1"] * 5 + ["sparse2"] * 5 + ["redense2"] * 5
    lrs = dict((name, lr) for name, lr, _ in log)
    assert lrs == {"dense": 0.1, "sparse1": 0.05, "redense1": pytest.approx(0.005), "sparse2": 0.02,
                   "redense2": pytest.approx(0.002)}  # fmt: skip
    sparsity = {name: s for name, _, s in log}
    assert sparsity["sparse1"] == 0.5 and sparsity["sparse2"] == 0.25 and sparsity["redense2"] == 0.0
    assert (model[0].weight != 0).all()  # excluded: never pruned


def test_a_sparse_phase_holds_its_masks_through_every_step():
    model, optimizer = make()
    driver = dsd.DSD(model, optimizer, RECIPE[:2], steps_per_epoch=STEPS)
    run(model, optimizer, driver, batches(12))  # into the sparse phase
    masks = {n: m.clone() for n, m in driver.pruner.masks.items()}
    run(model, optimizer, driver, batches(5, seed=3))
    assert all(torch.equal(masks[n], driver.pruner.masks[n]) for n in masks)  # chosen once, held
    params = dict(model.named_parameters())
    assert all(not params[n][~m].any() for n, m in masks.items())  # pruned entries exactly zero
    buffers = [optimizer.state[params[n]]["momentum_buffer"][~m] for n, m in masks.items()]
    assert all(not b.any() for b in buffers)  # momentum cannot revive them


def test_resume_mid_sparse_equals_no_interruption(tmp_path):
    data = batches(35)
    model, optimizer = make()
    straight = dsd.DSD(model, optimizer, RECIPE, steps_per_epoch=STEPS)
    run(model, optimizer, straight, data)

    model, optimizer = make()
    first = dsd.DSD(model, optimizer, RECIPE, steps_per_epoch=STEPS)
    run(model, optimizer, first, data[:13])  # stop 3 steps into the sparse phase
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "dsd": first.state_dict()},
               tmp_path / "ckpt.pt")  # fmt: skip
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model, optimizer = make()
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    resumed = dsd.DSD(model, optimizer, RECIPE, steps_per_epoch=STEPS)
    resumed.load_state_dict(saved["dsd"])
    assert resumed.phase.name == "sparse1" and resumed.step_in_phase == 3
    run(model, optimizer, resumed, data[13:])
    reference, _ = make()
    run_model = model
    for name, value in run_model.state_dict().items():
        assert torch.equal(value, dict(straight.model.state_dict())[name]), name
    del reference


@pytest.mark.parametrize("written", ["api", "yaml"])
def test_iht_is_a_recipe_the_driver_runs(written):
    if written == "api":
        recipe = dsd.Recipe.iht(
            dsd.Phase("dense", "dense", 1, 0.1), sparsity=0.5, cycles=3, epochs=1, lr=0.05
        )
    else:  # the entry a pipeline row's `phases:` takes
        iht = {"kind": "iht", "cycles": 3, "epochs": 1, "lr": 0.05, "sparsity": 0.5}
        recipe = [{"kind": "dense", "epochs": 1, "lr": 0.1}, iht]
    model, optimizer = make()
    driver = dsd.DSD(model, optimizer, recipe, steps_per_epoch=STEPS)
    log = []
    run(model, optimizer, driver, batches(40), log)
    assert [n for n, _, _ in log][::STEPS] == [
        "dense",
        "sparse1",
        "redense1",
        "sparse2",
        "redense2",
        "sparse3",
    ]
    assert {lr for name, lr, _ in log if name != "dense"} == {0.05}  # IHT re-dense keeps the sparse LR
    assert driver.done and model[0].weight.eq(0).float().mean() == pytest.approx(0.5, abs=0.01)  # ends sparse


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"cycles": 0}, "phases[1].cycles must be a whole number >= 1"),
        ({"lr": None}, "phases[1].lr is required for an iht entry"),
        ({"sparsity": None}, "phases[1].sparsity is required for an iht entry"),
        ({"kind": "sparse"}, "phases[1].cycles: only an iht entry takes cycles"),
    ],
)
def test_a_wrong_iht_entry_names_its_key(entry, message):
    iht = {"kind": "iht", "cycles": 2, "epochs": 1, "lr": 0.05, "sparsity": 0.5} | entry
    with pytest.raises(ValueError, match=re.escape(message)):
        dsd.Recipe.from_config([{"kind": "dense", "epochs": 1, "lr": 0.1}, iht])


def test_the_readme_quick_start_runs_as_written():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- quickstart:plain -->\n```python\n(.*?)```", readme, re.S).group(1)
    namespace = {}
    exec(compile(block, "README quick start", "exec"), namespace)  # noqa: S102 - our own documentation
    assert namespace["schedule"].done and namespace["schedule"].sparsity() == 0.0


@pytest.mark.parametrize("framework", ["lightning", "huggingface"])
def test_the_readme_framework_quick_starts_run_as_written(framework, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the Trainers write their folders here
    readme = (REPO / "README.md").read_text()
    block = re.search(rf"<!-- quickstart:{framework} -->\n```python\n(.*?)```", readme, re.S).group(1)
    assert (
        sum(line.split("#")[-1].startswith(" +") for line in block.splitlines()) < 10
    )  # lines added for DSD
    namespace = {"__name__": "quickstart"}
    exec(compile(block, f"README {framework} quick start", "exec"), namespace)  # noqa: S102
    driver = namespace["callbacks"][0].driver
    assert driver.done and driver.global_step == 70  # 7 epochs of 10 steps, then the recipe stopped training
