"""dsd.DSD, the recipe driver for any training loop: phases at the right steps, exact sparsity, re-dense at a
tenth of the LR, iterative DSD and IHT, exact resume; and the README's quick start, run as written."""

import copy
import re

import numpy as np
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


def interrupted_and_resumed(tmp_path, fresh, recipe, first_batches, build_first=False):
    """Train on `first_batches`, save model, optimizer and driver, then load them in the natural order (model,
    optimizer, a new driver, its state; or with `build_first` the driver built before anything is loaded) into
    fresh objects: what a resumed job holds."""
    model, optimizer = fresh()
    first = dsd.DSD(model, optimizer, recipe, steps_per_epoch=STEPS)
    run(model, optimizer, first, first_batches)
    saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "dsd": first.state_dict()}
    torch.save(saved, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model, optimizer = fresh()
    if build_first:
        resumed = dsd.DSD(model, optimizer, recipe, steps_per_epoch=STEPS)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    if not build_first:
        resumed = dsd.DSD(model, optimizer, recipe, steps_per_epoch=STEPS)
    resumed.load_state_dict(saved["dsd"])
    return model, optimizer, resumed


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

    model, optimizer, resumed = interrupted_and_resumed(tmp_path, make, RECIPE, data[:13])  # 3 into sparse1
    assert resumed.phase.name == "sparse1" and resumed.step_in_phase == 3
    run(model, optimizer, resumed, data[13:])
    reference, _ = make()
    run_model = model
    for name, value in run_model.state_dict().items():
        assert torch.equal(value, dict(straight.model.state_dict())[name]), name
    del reference


@pytest.mark.parametrize("make_optimizer", [lambda m: torch.optim.SGD(m.parameters(), lr=1.0, momentum=0.9),
                                            lambda m: torch.optim.AdamW(m.parameters(), lr=1.0)],
                         ids=["sgd", "adamw"])  # fmt: skip
@pytest.mark.parametrize("build_first", [False, True], ids=["loaded-then-built", "built-then-loaded"])
def test_a_pretrained_start_resumes_in_its_redense_phase_exactly(tmp_path, make_optimizer, build_first):
    """A recipe that starts sparse (dense epochs 0) prunes when it is built: built after the model and optimizer
    were loaded (the natural order; the callbacks' too), it must not prune the re-densed weights it resumes;
    built before they were loaded, it must not put its pre-pruning weights over the loaded ones."""
    recipe = [{"kind": "dense", "epochs": 0}, *RECIPE[1:3]]
    data = batches(15)

    def fresh():
        model, _ = make()
        return model, make_optimizer(model)

    model, optimizer = fresh()
    straight = dsd.DSD(model, optimizer, recipe, steps_per_epoch=STEPS)
    run(model, optimizer, straight, data)
    model, optimizer, resumed = interrupted_and_resumed(tmp_path, fresh, recipe, data[:12], build_first)
    assert resumed.phase.name == "redense1" and resumed.pruner is None
    run(model, optimizer, resumed, data[12:])
    for name, value in model.state_dict().items():
        assert torch.equal(value, straight.model.state_dict()[name]), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_pretrained_start_built_on_the_cpu_resumes_on_the_gpu(tmp_path):
    """Built on the CPU (where it prunes), the model then moved to the GPU and the checkpoint loaded: the driver
    compares the weights it pruned with its CPU copies of them, which used to fail across devices."""
    recipe, data = (
        [{"kind": "dense", "epochs": 0}, *RECIPE[1:3]],
        [(x.cuda(), y.cuda()) for x, y in batches(15)],
    )
    model, optimizer = make()
    straight = dsd.DSD(model.cuda(), optimizer, recipe, steps_per_epoch=STEPS)
    run(model, optimizer, straight, data)
    model, optimizer = make()
    first = dsd.DSD(model.cuda(), optimizer, recipe, steps_per_epoch=STEPS)
    run(model, optimizer, first, data[:12])
    saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "dsd": first.state_dict()}
    model, optimizer = make()
    resumed = dsd.DSD(model, optimizer, recipe, steps_per_epoch=STEPS)  # on the CPU
    model.cuda().load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    resumed.load_state_dict(saved["dsd"])
    run(model, optimizer, resumed, data[12:])
    for name, value in model.state_dict().items():
        assert torch.equal(value, straight.model.state_dict()[name]), name


def test_rprop_step_sizes_restart_at_the_redense_lr():
    model, _ = make()
    optimizer = torch.optim.Rprop(model.parameters(), lr=1.0)
    driver = dsd.DSD(model, optimizer, RECIPE[:3], steps_per_epoch=STEPS)
    run(model, optimizer, driver, batches(20))  # the last step enters redense1
    assert driver.phase.name == "redense1"
    for name, mask in {"0.weight": model[0].weight == 0, "2.weight": model[2].weight == 0}.items():
        step_size = optimizer.state[dict(model.named_parameters())[name]]["step_size"]
        assert mask.any() and torch.allclose(step_size[mask], torch.tensor(0.005)), name


def test_a_tensor_lr_is_set_in_place():
    """A tensor LR (capturable / compiled optimizers) is read by address by a captured step: replaced by a
    float, the captured step would keep the old rate."""
    model, _ = make()
    lr = torch.tensor(1.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    driver = dsd.DSD(model, optimizer, RECIPE[:3], steps_per_epoch=STEPS)
    run(model, optimizer, driver, batches(10))  # into sparse1
    assert optimizer.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(0.05)


def test_a_fractional_phase_has_the_steps_its_epochs_say():
    model, optimizer = make()
    recipe = [
        {"kind": "dense", "epochs": 0.14, "lr": 0.1},
        {"kind": "sparse", "epochs": 0.28, "lr": 0.1, "sparsity": 0.5},
    ]
    driver = dsd.DSD(model, optimizer, recipe, steps_per_epoch=50)
    assert driver.lengths == [7, 14]  # not ceil(0.14 * 50) = ceil(7.000000000000001) = 8


@pytest.mark.parametrize("steps", [2.5, float("inf"), True, 0])
def test_steps_per_epoch_must_be_a_whole_number(steps):
    """2.5 was taken (each phase of 1 epoch ran 3 steps), inf (an unsized loader) failed in math.ceil."""
    model, optimizer = make()
    with pytest.raises(
        ValueError, match=f"^steps_per_epoch must be a whole number of at least 1, got {steps!r}"
    ):
        dsd.DSD(model, optimizer, RECIPE, steps_per_epoch=steps)


def test_steps_per_epoch_may_be_a_numpy_integer():
    model, optimizer = make()
    driver = dsd.DSD(model, optimizer, RECIPE, steps_per_epoch=np.int64(STEPS))
    assert type(driver.state_dict()["steps_per_epoch"]) is int  # loadable with weights_only=True


def test_a_state_of_another_steps_per_epoch_is_refused():
    model, optimizer = make()
    state = dsd.DSD(model, optimizer, RECIPE, steps_per_epoch=STEPS).state_dict()
    with pytest.raises(ValueError, match="steps_per_epoch=5, this one has 10"):
        dsd.DSD(model, optimizer, RECIPE, steps_per_epoch=10).load_state_dict(state)


def test_patterns_are_checked_when_the_driver_is_built():
    model, optimizer = make()
    with pytest.raises(ValueError, match="'0.wieght'"):  # not after the dense phase has trained
        dsd.DSD(model, optimizer, RECIPE, steps_per_epoch=STEPS, exclude=["0.wieght"])
    with pytest.raises(ValueError, match="no weight of 2\\+ dimensions left to prune"):
        dsd.DSD(model, optimizer, RECIPE, steps_per_epoch=STEPS, include=["0.bias"])
    with pytest.raises(TypeError, match="exclude: a list of names or patterns, got the string '0.weight'"):
        dsd.DSD(model, optimizer, RECIPE, steps_per_epoch=STEPS, exclude="0.weight")


def test_a_tied_weight_is_excluded_by_any_of_its_names():
    model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 10, bias=False), nn.Linear(10, 10))
    model[1].weight = model[0].weight  # tied (as a language model's input and output embeddings)
    pruner = dsd.Pruner(model, 0.5, exclude=["1.weight"])
    assert set(pruner.masks) == {"2.weight"}


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


def test_numpy_numbers_make_the_same_recipe_and_nan_is_refused():
    """Numbers from numpy (a sweep's np.float32 sparsity, epochs computed as np.int64) were refused as "must be a
    number ..., got np.float32(0.5)"; a NaN LR was accepted and trained every weight to NaN."""
    written = [
        {"kind": "dense", "epochs": np.int64(2), "lr": np.float32(0.5)},
        {
            "kind": "iht",
            "cycles": np.int64(2),
            "epochs": np.float64(1.5),
            "lr": np.float32(0.25),
            "sparsity": np.float32(0.5),
        },
    ]
    plain = [
        {"kind": "dense", "epochs": 2, "lr": 0.5},
        {"kind": "iht", "cycles": 2, "epochs": 1.5, "lr": 0.25, "sparsity": 0.5},
    ]
    assert dsd.Recipe.from_config(written) == dsd.Recipe.from_config(plain)
    assert dsd.Pruner(make()[0], np.float32(0.5)).overall_sparsity() == 0.5
    for key in ("lr", "epochs"):
        with pytest.raises(ValueError, match=rf"phases\[0\]\.{key} must be a"):
            dsd.Recipe.from_config([{"kind": "dense", "epochs": 1, "lr": 0.1} | {key: float("nan")}])


def test_the_readme_quick_start_runs_as_written():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- quickstart:plain -->\n```python\n(.*?)```", readme, re.S).group(1)
    namespace = {}
    exec(compile(block, "README quick start", "exec"), namespace)  # noqa: S102 - our own documentation
    assert namespace["schedule"].done and namespace["schedule"].sparsity() == 0.0


class _Net(nn.Module):
    """A model with the README's `conv1.weight`, for the Pruner snippet."""

    def __init__(self):
        super().__init__()
        self.conv1, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(self.conv1(x).flatten(1))


def test_the_readme_pruner_snippet_runs_as_written():
    """The core library's first snippet, with the model, optimizer, loss and data it leaves to the reader."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- quickstart:pruner -->\n```python\n(.*?)```", readme, re.S).group(1)
    torch.manual_seed(0)
    model = _Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    loader = [(torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))) for _ in range(3)]
    namespace = {"model": model, "optimizer": optimizer, "loader": loader, "criterion": nn.CrossEntropyLoss()}
    exec(compile(block, "README Pruner snippet", "exec"), namespace)  # noqa: S102 - our own documentation
    pruner, state = namespace["pruner"], namespace["state"]
    assert not pruner.active and pruner.masks == {}  # removed: re-dense
    resumed = dsd.Pruner.from_state_dict(model, state)  # what the snippet's comment says resumes it
    assert list(resumed.masks) == ["fc.weight"] and resumed.masks["fc.weight"].dtype == torch.bool
    assert int((~resumed.masks["fc.weight"]).sum()) == round(0.3 * model.fc.weight.numel())


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


def test_param_groups_keep_their_learning_rate_ratios_through_the_recipe():
    """Layer-wise LRs (a backbone at a tenth of the head's): every phase's LR goes to the largest group and the
    others keep their ratio, also for a group added later and after a resume; they were all set to one LR."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    groups = [{"params": model[0].parameters(), "lr": 0.01}, {"params": model[2].parameters(), "lr": 0.1}]
    optimizer = torch.optim.SGD(groups, lr=0.5, momentum=0.9)
    recipe = [
        {"kind": "dense", "epochs": 1, "lr": 0.2},
        {"kind": "sparse", "epochs": 1, "lr": 0.04, "sparsity": 0.5},
        {"kind": "redense", "epochs": 1},
    ]
    run, seen = dsd.DSD(model, optimizer, recipe, steps_per_epoch=2), []
    while not run.done:
        seen.append([g["lr"] for g in optimizer.param_groups])
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        run.step()
        if run.global_step == 3:
            saved = optimizer.state_dict(), run.state_dict()
    flat = [lr for step in seen for lr in step]
    assert flat == pytest.approx([0.02, 0.2] * 2 + [0.004, 0.04] * 2 + [0.0004, 0.004] * 2)
    extra = nn.Parameter(torch.zeros(2))
    optimizer.add_param_group({"params": [extra], "lr": 0.05})  # half the largest group's LR at the start
    resumed = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 0.01}, {"params": model[2].parameters(), "lr": 0.1}], lr=0.5
    )
    again = dsd.DSD(model, resumed, recipe, steps_per_epoch=2)
    resumed.load_state_dict(saved[0])
    again.load_state_dict(saved[1])
    assert [g["lr"] for g in resumed.param_groups] == pytest.approx([0.004, 0.04])  # step 3: sparse
    run.global_step, run.index = 4, 2
    run._set_lr()
    assert optimizer.param_groups[2]["lr"] == pytest.approx(0.002)  # a tenth of the sparse LR, halved


def test_a_param_group_added_within_a_phase_takes_its_first_step_at_the_recipes_lr():
    """A layer unfrozen mid-phase (`add_param_group` at the optimizer's default LR, 0.1): its first step ran at
    0.1, not at the phase's 0.2, since the driver sets LRs only in `step()`, after that optimizer step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    model[0].requires_grad_(False)
    optimizer = torch.optim.SGD(model[2].parameters(), lr=0.1)
    recipe = [
        {"kind": "dense", "epochs": 1, "lr": 0.2},
        {"kind": "sparse", "epochs": 1, "lr": 0.04, "sparsity": 0.5},
    ]
    run = dsd.DSD(model, optimizer, recipe, steps_per_epoch=2)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    run.step()
    optimizer.add_param_group({"params": model[0].requires_grad_(True).parameters()})
    before = model[0].weight.detach().clone()
    model(torch.randn(3, 4)).sum().backward()
    grad = model[0].weight.grad.clone()
    optimizer.step()
    assert torch.allclose(model[0].weight, before - 0.2 * grad)  # not before - 0.1 * grad
    assert [g["lr"] for g in optimizer.param_groups] == [0.2, 0.2]


def test_a_warmup_scheduler_built_before_the_driver_does_not_freeze_training():
    """A warmup scheduler (the Hugging Face Trainer's `warmup_steps`, a Lightning module's LambdaLR) sets every
    group's LR to 0 when it is built: the groups' ratios were read from that 0 and held every LR at 0 for the
    whole recipe. They come from the LRs the groups were built with (`initial_lr`)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    groups = [{"params": model[0].parameters(), "lr": 0.01}, {"params": model[2].parameters(), "lr": 0.1}]
    optimizer = torch.optim.SGD(groups, lr=0.5)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, step / 3))
    assert [g["lr"] for g in optimizer.param_groups] == [0.0, 0.0]
    recipe = [
        {"kind": "dense", "epochs": 1, "lr": 0.2},
        {"kind": "sparse", "epochs": 1, "lr": 0.04, "sparsity": 0.5},
    ]
    run, seen = dsd.DSD(model, optimizer, recipe, steps_per_epoch=2), []
    while not run.done:
        seen.append([g["lr"] for g in optimizer.param_groups])
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
        warmup.step()
        run.step()
    assert [lr for step in seen for lr in step] == pytest.approx([0.02, 0.2] * 2 + [0.004, 0.04] * 2)
    everything_at_zero = torch.optim.SGD(model.parameters(), lr=0.0)  # no ratio to keep: all get the recipe's
    dsd.DSD(model, everything_at_zero, recipe, steps_per_epoch=2)
    assert everything_at_zero.param_groups[0]["lr"] == 0.2


def test_a_model_stepped_by_two_optimizers_gets_both_masked_and_both_lrs():
    """A model split between two optimizers (Adam for one layer, SGD with momentum for the other), passed as a
    list: each one's LR follows the recipe at its ratio, and each one's state is zero at the pruned entries when
    the re-dense phase starts (state left there would revive pruned weights at once)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    adam = torch.optim.Adam(model[0].parameters(), lr=0.01)
    sgd = torch.optim.SGD(model[2].parameters(), lr=0.1, momentum=0.9)
    driver, lrs = dsd.DSD(model, [adam, sgd], RECIPE[:3], steps_per_epoch=STEPS), []
    for x, y in batches(25):
        lrs.append((adam.param_groups[0]["lr"], sgd.param_groups[0]["lr"]))
        masks = driver.pruner.masks if driver.pruner is not None else None
        loss = nn.functional.cross_entropy(model(x), y)
        adam.zero_grad(), sgd.zero_grad()
        loss.backward()
        adam.step(), sgd.step()
        driver.step()
        if driver.global_step == 20:  # the sparse phase is over: what the re-dense phase starts from
            params = dict(model.named_parameters())
            state = [adam.state[params["0.weight"]]["exp_avg"], adam.state[params["0.weight"]]["exp_avg_sq"],
                     sgd.state[params["2.weight"]]["momentum_buffer"], params["0.weight"], params["2.weight"]]  # fmt: skip
            first, second = ~masks["0.weight"], ~masks["2.weight"]
            pruned = [first, first, second, first, second]
            assert all(t[p].abs().sum() == 0 and p.any() for t, p in zip(state, pruned, strict=True))
    assert driver.done and lrs[0] == pytest.approx((0.01, 0.1)) and lrs[10] == pytest.approx((0.005, 0.05))
    assert lrs[-1] == pytest.approx((0.0005, 0.005))  # re-dense: a tenth of the sparse LR, for both


class SmallLSTM(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.rnn = nn.LSTM(8, width, batch_first=True)
        self.fc = nn.Linear(width, 3)

    def forward(self, x):
        return self.fc(self.rnn(x)[0])


SMALL_MODELS = {  # a model of a given width, and an input for it
    "linear": (lambda width: nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 3)),
               lambda g: torch.randn(4, 8, generator=g)),
    "conv": (lambda width: nn.Sequential(nn.Conv2d(3, width, 3), nn.ReLU(), nn.Conv2d(width, 4, 3)),
             lambda g: torch.randn(2, 3, 6, 6, generator=g)),
    "lstm": (SmallLSTM, lambda g: torch.randn(2, 5, 8, generator=g)),
}  # fmt: skip
STARTS = {  # a recipe, and the steps its driver has taken when a state is loaded into it
    "mid-sparse": ([{"kind": "dense", "epochs": 1, "lr": 0.1}, *RECIPE[1:3]], 7),
    "pretrained": ([{"kind": "dense", "epochs": 0}, *RECIPE[1:3]], 0),  # pruned when built
}


def small_run(kind, start, steps, width=6, exclude=()):
    """A model of `kind` trained `steps` steps under the driver of `start`'s recipe: model, optimizer, driver."""
    make_model, make_input = SMALL_MODELS[kind]
    torch.manual_seed(0)
    model = make_model(width)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    driver = dsd.DSD(model, optimizer, STARTS[start][0], steps_per_epoch=STEPS, exclude=exclude)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        optimizer.zero_grad()
        model(make_input(g)).square().mean().backward()
        optimizer.step()
        driver.step()
    return model, optimizer, driver


def misfit(kind, start, how):
    """A DSD state, mid-sparse, that does not fit a `kind` model of width 6 driven by `start`'s recipe."""
    width, exclude = (
        (12, ()) if how == "other model" else (6, ["fc.weight" if kind == "lstm" else "2.weight"])
    )
    state = copy.deepcopy(
        small_run(kind, start, 8, width, exclude if how == "other exclude" else ())[2].state_dict()
    )
    first = next(iter(state["pruner"]["masks"]))
    if how == "missing key":
        del state["global_step"]
    elif how == "truncated mask":
        state["pruner"]["masks"][first] = state["pruner"]["masks"][first][:-1]
    elif how == "no masks":
        state["pruner"] = None
    return state


def snapshot(model, optimizer, driver):
    pruner = driver.pruner
    masks = {n: m.clone() for n, m in pruner.masks.items()} if pruner is not None else None
    return (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()), driver.global_step,
            driver.index, pruner, masks, pruner is not None and pruner.active)  # fmt: skip


def same(a, b):
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return torch.equal(a, b) if torch.is_tensor(a) else a is b or a == b


MISFITS = {"other model": "has shape", "other exclude": "has no mask for", "missing key": "has no 'global_step'",
           "truncated mask": "damaged", "no masks": "has no masks"}  # fmt: skip


@pytest.mark.parametrize("how", list(MISFITS))
@pytest.mark.parametrize("start", list(STARTS))
@pytest.mark.parametrize("kind", list(SMALL_MODELS))
def test_a_state_that_does_not_fit_changes_nothing(kind, start, how):
    """Loading checks the whole state first: one that does not fit raises, naming what, and leaves the driver (step,
    phase, masks), the model and the optimizer as they were; the right state loads into it afterwards as into a
    fresh driver (a pretrained start's construction pruning still undone)."""
    model, optimizer, driver = small_run(kind, start, STARTS[start][1])
    before = snapshot(model, optimizer, driver)
    with pytest.raises(ValueError, match=MISFITS[how]):
        driver.load_state_dict(misfit(kind, start, how))
    assert same(snapshot(model, optimizer, driver), before)

    fitting = small_run(kind, start, 8)[2].state_dict()
    driver.load_state_dict(fitting)
    twin_model, _, twin = small_run(kind, start, STARTS[start][1])
    twin.load_state_dict(fitting)
    assert (driver.global_step, driver.index) == (twin.global_step, twin.index) == (8, 1)
    assert same(driver.pruner.masks, twin.pruner.masks) and same(model.state_dict(), twin_model.state_dict())


def test_a_state_whose_step_and_phase_disagree_is_refused():
    model, optimizer, driver = small_run("linear", "mid-sparse", 3)
    state = small_run("linear", "mid-sparse", 8)[2].state_dict() | {"index": 2}  # step 8 is in sparse1
    with pytest.raises(ValueError, match="in phase 2 at step 8, which is in phase 1"):
        driver.load_state_dict(state)
    assert (driver.global_step, driver.index, driver.pruner) == (3, 0, None)


@pytest.mark.parametrize("kind", list(SMALL_MODELS))
def test_a_sparse_driver_rolled_back_to_a_dense_checkpoint_keeps_the_weights_loaded(kind):
    """Model, optimizer, then driver (the natural order) loaded into objects already in a sparse phase: the
    driver's masks of that phase used to prune the dense weights just loaded."""
    model, optimizer, driver = small_run(kind, "mid-sparse", 3)  # dense
    saved = copy.deepcopy(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "dsd": driver.state_dict()}
    )
    model, optimizer, driver = small_run(kind, "mid-sparse", 8)  # the same run, on into sparse1
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    driver.load_state_dict(saved["dsd"])
    assert driver.pruner is None and (driver.global_step, driver.phase.name) == (3, "dense")
    assert same(model.state_dict(), saved["model"])
