"""DSD as a Lightning callback and a Hugging Face TrainerCallback, run with the real frameworks on a small model:
phases at the right steps, exact sparsity, re-dense at a tenth of the LR, the recipe's end stops training, logs,
and a resume from a checkpoint taken mid-sparse gives the weights of an uninterrupted run."""

import warnings

import pytest
import torch
from torch import nn

RECIPE = [
    {"kind": "dense", "epochs": 2, "lr": 0.1},
    {"kind": "sparse", "epochs": 2, "lr": 0.05, "sparsity": 0.5},
    {"kind": "redense", "epochs": 1},
]
BATCHES, BATCH = 5, 4  # per epoch
EXPECTED_LR = [0.1] * 10 + [0.05] * 10 + [0.005] * 5
# what a framework run stopped by its own limit one epoch into the sparse phase says
STOPPED_MID_SPARSE = (
    r"^DSD: training ended in the recipe's phase sparse1 \(sparse\) after 5 of its 10 steps, 15 of the "
    r"recipe's 25; the model is still pruned$"
)


def dataset():
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCHES * BATCH, 8, generator=g), torch.randint(0, 3, (BATCHES * BATCH,), generator=g)


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def zero_fraction(weight):
    return (weight == 0).float().mean().item()


# ------------------------------------------------------------------------------------------------ Lightning

L = pytest.importorskip("lightning.pytorch")
from dsd.integrations.lightning import DSDCallback  # noqa: E402


class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net, self.seen = net(), []

    def training_step(self, batch, _):
        x, y = batch
        self.seen.append((self.optimizers().param_groups[0]["lr"], zero_fraction(self.net[2].weight)))
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0, momentum=0.9)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*dataset()), batch_size=BATCH)


def lightning_fit(module, tmp_path, max_epochs, ckpt_path=None, logger=False, callback=None):
    callback = callback or DSDCallback(RECIPE, exclude=["net.0.weight"])
    trainer = L.Trainer(max_epochs=max_epochs, accelerator="cpu", logger=logger, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
                        callbacks=[callback])  # fmt: skip
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def test_lightning_follows_the_recipe_and_stops_at_its_end(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    module = Module()
    trainer = lightning_fit(module, tmp_path, max_epochs=50, logger=CSVLogger(tmp_path, name="log"))
    assert trainer.global_step == 25  # stopped by the recipe, not max_epochs
    assert [lr for lr, _ in module.seen] == pytest.approx(EXPECTED_LR)
    zeros = [z for _, z in module.seen]
    assert zeros[:10] == [0.0] * 10 and zeros[11:20] == [0.5] * 9  # masks chosen at step 10, kept
    assert zeros[-1] < 0.5 and (module.net[0].weight != 0).all()  # re-dense regrows; excluded layer dense
    import pandas as pd

    log = pd.read_csv(next(tmp_path.glob("log/*/metrics.csv"))).dropna(subset=["dsd/lr"])
    assert len(log) == 25 and log["dsd/sparsity"].tolist()[10:20] == [0.5] * 10
    assert log["dsd/phase"].tolist() == [0.0] * 10 + [1.0] * 10 + [2.0] * 5


def test_lightning_resume_mid_sparse_matches_an_uninterrupted_run(tmp_path):
    whole = Module()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        lightning_fit(whole, tmp_path, max_epochs=50)
    assert not [w for w in seen if str(w.message).startswith("DSD:")]  # the recipe ran to its end
    first = Module()
    with pytest.warns(UserWarning, match=STOPPED_MID_SPARSE):
        trainer = lightning_fit(first, tmp_path, max_epochs=3)  # stops one epoch into the sparse phase
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    resumed = Module()
    lightning_fit(resumed, tmp_path, max_epochs=50, ckpt_path=tmp_path / "mid.ckpt")
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert [lr for lr, _ in resumed.seen] == pytest.approx(EXPECTED_LR[15:])


def test_a_lightning_callback_reused_after_a_resume_starts_the_next_fit_afresh(tmp_path):
    """The same callback in a later fit without `ckpt_path` (a loop over runs): it loaded the earlier fit's
    checkpoint again, so a fresh model started mid-sparse, pruned, and the recipe ended after 10 of its 25 steps."""
    with pytest.warns(UserWarning, match=STOPPED_MID_SPARSE):
        lightning_fit(Module(), tmp_path, max_epochs=3).save_checkpoint(tmp_path / "mid.ckpt")
    callback = DSDCallback(RECIPE, exclude=["net.0.weight"])
    lightning_fit(Module(), tmp_path, max_epochs=50, ckpt_path=tmp_path / "mid.ckpt", callback=callback)
    fresh = Module()
    assert lightning_fit(fresh, tmp_path, max_epochs=50, callback=callback).global_step == 25
    assert [lr for lr, _ in fresh.seen] == pytest.approx(EXPECTED_LR)
    assert [z for _, z in fresh.seen][:10] == [0.0] * 10


def test_lightning_resuming_a_finished_recipe_trains_nothing(tmp_path):
    """A finished run resumed (a requeued job) took one more batch, unmasked and at the last LR before stopping."""
    whole = Module()
    lightning_fit(whole, tmp_path, max_epochs=50).save_checkpoint(tmp_path / "end.ckpt")
    resumed = Module()
    assert lightning_fit(resumed, tmp_path, max_epochs=50, ckpt_path=tmp_path / "end.ckpt").global_step == 25
    assert resumed.seen == []
    assert all(torch.equal(a, b) for a, b in zip(whole.parameters(), resumed.parameters(), strict=True))


class TwoOptimizers(Module):
    """Each linear layer stepped by its own optimizer (manual optimization, as Lightning requires for two)."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, _):
        x, y = batch
        first, second = self.optimizers()
        self.seen.append((first.param_groups[0]["lr"], second.param_groups[0]["lr"],
                          zero_fraction(self.net[0].weight), zero_fraction(self.net[2].weight)))  # fmt: skip
        first.zero_grad(), second.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(self.net(x), y))
        first.step(), second.step()

    def configure_optimizers(self):
        return (torch.optim.SGD(self.net[0].parameters(), lr=1.0, momentum=0.9),
                torch.optim.Adam(self.net[2].parameters(), lr=1.0))  # fmt: skip


def two_optimizer_fit(max_epochs, ckpt_path=None):
    module = TwoOptimizers()
    trainer = L.Trainer(max_epochs=max_epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[DSDCallback(RECIPE)])  # fmt: skip
    trainer.fit(module, ckpt_path=ckpt_path)
    return module, trainer


class Unsized(torch.utils.data.IterableDataset):
    def __iter__(self):
        return zip(*dataset(), strict=True)


def test_lightning_without_batches_per_epoch_says_so(tmp_path):
    """A loader without a length (an IterableDataset) gives Lightning an infinite epoch: the callback failed in
    math.ceil with 'cannot convert float infinity to integer'. limit_train_batches gives the epoch its length."""
    loader = torch.utils.data.DataLoader(Unsized(), batch_size=BATCH)
    options = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
               "enable_checkpointing": False, "callbacks": [DSDCallback(RECIPE)]}  # fmt: skip
    with pytest.raises(ValueError, match="no length; set the Trainer's limit_train_batches"):
        L.Trainer(max_epochs=1, **options).fit(Module(), loader)
    trainer = L.Trainer(max_epochs=50, limit_train_batches=4, **options)
    trainer.fit(Module(), loader)
    driver = trainer.callbacks[0].driver
    assert driver.done and driver.lengths == [8, 8, 4] and trainer.global_step == 20


class PlateauModule(Module):
    """A ReduceLROnPlateau that halves the LR after every epoch (mode max on a loss that does not rise)."""

    def training_step(self, batch, index):
        loss = super().training_step(batch, index)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", patience=0, factor=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": plateau, "monitor": "train_loss"}}


def test_lightning_overrides_a_plateau_scheduler_at_every_step(tmp_path):
    """A ReduceLROnPlateau steps at the epoch's end, after the callback set the LR: the first step of an epoch
    ran at the plateau's LR, not the recipe's."""
    module = PlateauModule()
    lightning_fit(module, tmp_path, max_epochs=50)
    assert [lr for lr, _ in module.seen] == pytest.approx(EXPECTED_LR)


def test_lightning_with_two_optimizers_steps_the_recipe_per_batch_and_masks_both(tmp_path):
    """Lightning's global_step counts both optimizers' steps (50 for 25 batches): the recipe still ends after
    25 batches, both optimizers follow its LRs, both layers are pruned, and both optimizers' state is masked
    (else re-dense starts from momentum that revives pruned weights). A resume mid-sparse is exact."""
    module, trainer = two_optimizer_fit(max_epochs=50)
    assert trainer.global_step == 50 and len(module.seen) == 25
    assert [a for a, *_ in module.seen] == pytest.approx(EXPECTED_LR) == [b for _, b, *_ in module.seen]
    assert [z for *_, z, _ in module.seen][11:20] == [0.5] * 9 == [z for *_, z in module.seen][11:20]
    with pytest.warns(UserWarning, match=STOPPED_MID_SPARSE):
        _, trainer = two_optimizer_fit(max_epochs=3)  # one epoch into the sparse phase
    for optimizer, buffer in zip(trainer.optimizers, ("momentum_buffer", "exp_avg"), strict=True):
        for weight in (p for p in optimizer.param_groups[0]["params"] if p.dim() == 2):
            assert torch.equal(optimizer.state[weight][buffer] == 0, weight == 0) and (weight == 0).any()
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    resumed, _ = two_optimizer_fit(max_epochs=50, ckpt_path=tmp_path / "mid.ckpt")
    for a, b in zip(module.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------- Hugging Face


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = net()

    def forward(self, x, labels):
        return {"loss": nn.functional.cross_entropy(self.net(x), labels)}


def hf_train(tmp_path, resume=None, max_steps=-1, save_steps=500, resume_in_args=False):
    transformers = pytest.importorskip("transformers")
    from dsd.integrations.huggingface import DSDTrainerCallback

    x, y = dataset()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=BATCH, num_train_epochs=50,
        max_steps=max_steps, learning_rate=1.0, lr_scheduler_type="linear", optim="sgd", logging_steps=1,
        save_strategy="steps", save_steps=save_steps, report_to=[], use_cpu=True, seed=0,
        disable_tqdm=True, resume_from_checkpoint=resume if resume_in_args else None,
    )  # fmt: skip
    model, rows = Classifier(), [{"x": a, "labels": b} for a, b in zip(x, y, strict=True)]
    callback = DSDTrainerCallback(RECIPE, exclude=["net.0.weight"])
    trainer = transformers.Trainer(model, args, train_dataset=rows, callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def test_huggingface_without_batches_per_epoch_says_so(tmp_path):
    """A dataset without a length (max_steps bounds the run): the callback failed on len() with a TypeError."""
    transformers = pytest.importorskip("transformers")
    from dsd.integrations.huggingface import DSDTrainerCallback

    class Rows(torch.utils.data.IterableDataset):
        def __iter__(self):
            return ({"x": a, "labels": b} for a, b in zip(*dataset(), strict=True))

    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, max_steps=5,
                                          report_to=[], use_cpu=True, save_strategy="no")  # fmt: skip
    trainer = transformers.Trainer(
        Classifier(), args, train_dataset=Rows(), callbacks=[DSDTrainerCallback(RECIPE)]
    )
    with pytest.raises(
        ValueError, match="train dataloader has no length; give the Trainer a dataset with a length"
    ):
        trainer.train()


def test_huggingface_follows_the_recipe_and_resumes_mid_sparse(tmp_path):
    whole, trainer = hf_train(tmp_path / "a")
    assert trainer.state.global_step == 25  # stopped by the recipe, not num_train_epochs
    logs = [h for h in trainer.state.log_history if "dsd_lr" in h]
    assert [h["dsd_lr"] for h in logs] == pytest.approx(EXPECTED_LR)  # the linear scheduler is overridden
    assert [h["dsd_phase"] for h in logs] == [0] * 10 + [1] * 10 + [2] * 5
    assert [h["dsd_sparsity"] for h in logs][10:20] == [0.5] * 10
    assert (whole.net[0].weight != 0).all() and zero_fraction(whole.net[2].weight) < 0.5  # regrown

    with pytest.warns(UserWarning, match=STOPPED_MID_SPARSE):
        hf_train(tmp_path / "b", max_steps=15, save_steps=15)  # stops one epoch into the sparse phase
    checkpoint = tmp_path / "b" / "hf" / "checkpoint-15"
    assert (checkpoint / "dsd.pt").exists()
    (tmp_path / "c").mkdir()
    import shutil

    shutil.copytree(checkpoint, tmp_path / "c" / "hf" / "checkpoint-15")
    resumed, _ = hf_train(tmp_path / "c", resume=str(tmp_path / "c" / "hf" / "checkpoint-15"))
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    # a dsd.pt that is not this checkpoint's (masks of another run): refused, not applied to these weights
    stale = tmp_path / "d" / "hf" / "checkpoint-15"
    shutil.copytree(checkpoint, stale)
    state = torch.load(stale / "dsd.pt", weights_only=True)
    name = next(iter(state["pruner"]["masks"]))
    state["pruner"]["masks"][name] = ~state["pruner"]["masks"][name]  # every kept weight now "pruned"
    torch.save(state, stale / "dsd.pt")
    with pytest.raises(ValueError, match="its masks do not fit the weights resumed"):
        hf_train(tmp_path / "d", resume=str(stale))
    # a checkpoint outside output_dir: the Trainer does not tell callbacks the folder given to train() alone
    elsewhere = tmp_path / "moved" / "checkpoint-15"
    shutil.copytree(checkpoint, elsewhere)
    with pytest.raises(FileNotFoundError, match="name it in TrainingArguments.resume_from_checkpoint"):
        hf_train(tmp_path / "e", resume=str(elsewhere))
    resumed, _ = hf_train(tmp_path / "f", resume=str(elsewhere), resume_in_args=True)
    assert all(torch.equal(a, b) for a, b in zip(whole.parameters(), resumed.parameters(), strict=True))


def test_huggingface_resuming_a_finished_recipe_leaves_the_model_as_it_ended(tmp_path):
    """A finished run resumed (a requeued job): the Trainer takes one step before the callback can stop it, which
    trained the model unmasked at the last LR; the model is put back as the recipe left it."""
    whole, _ = hf_train(tmp_path, save_steps=25)
    resumed, trainer = hf_train(tmp_path, resume=str(tmp_path / "hf" / "checkpoint-25"))
    assert trainer.state.global_step == 26
    assert all(torch.equal(a, b) for a, b in zip(whole.parameters(), resumed.parameters(), strict=True))


def hf_lrs_seen(**settings) -> list[float]:
    """The LR of every step of a Trainer run with the callback (its own scheduler per `settings`)."""
    transformers = pytest.importorskip("transformers")
    from dsd.integrations.huggingface import DSDTrainerCallback

    seen = []

    class LRs(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, **kw):
            seen.append(optimizer.param_groups[0]["lr"])

    x, y = dataset()
    args = transformers.TrainingArguments(
        per_device_train_batch_size=BATCH, num_train_epochs=5, optim="sgd", report_to=[], use_cpu=True,
        save_strategy="no", disable_tqdm=True, **settings,
    )  # fmt: skip
    rows = [{"x": a, "labels": b} for a, b in zip(x, y, strict=True)]
    callbacks = [DSDTrainerCallback(RECIPE), LRs()]
    transformers.Trainer(
        Classifier(), args, train_dataset=rows, eval_dataset=rows, callbacks=callbacks
    ).train()
    return seen


def test_huggingface_with_warmup_steps_trains_at_the_recipes_lr(tmp_path):
    """`warmup_steps` makes the Trainer's scheduler set the LR to 0 before the callback starts: the callback
    read that 0 as every group's share of the recipe's LR, and nothing trained."""
    assert hf_lrs_seen(output_dir=str(tmp_path), warmup_steps=3) == pytest.approx(EXPECTED_LR)


def test_huggingface_overrides_a_plateau_scheduler_at_every_step(tmp_path):
    """`reduce_lr_on_plateau` steps after each evaluation, past the callback's on_step_end: the step after an
    evaluation ran at the plateau's LR, not the recipe's."""
    seen = hf_lrs_seen(
        output_dir=str(tmp_path), lr_scheduler_type="reduce_lr_on_plateau",
        lr_scheduler_kwargs={"mode": "max", "patience": 0}, eval_strategy="steps", eval_steps=2,
        metric_for_best_model="loss",
    )  # fmt: skip
    assert seen == pytest.approx(EXPECTED_LR)


def test_huggingface_resume_check_reads_a_compiled_model_under_its_own_names():
    pytest.importorskip("transformers")
    import dsd
    from dsd.integrations.huggingface import masks_fit

    model = net()
    state = dsd.Pruner(model, 0.5).state_dict()
    assert masks_fit(torch.compile(model), state) and masks_fit(model, state)


def test_huggingface_saves_into_a_hyperparameter_search_trials_checkpoint(tmp_path):
    """Under `hyperparameter_search` the Trainer saves into the trial's run folder (`output_dir/run-<id>`): the
    DSD state went to `output_dir/checkpoint-N`, a crash (no such folder) or, left by an earlier run there, that
    run's checkpoint overwritten. Each trial is run as the search's wandb backend runs it (a sweep agent needs a
    server): `train(trial=params)` with the backend set."""
    transformers = pytest.importorskip("transformers")
    wandb = pytest.importorskip("wandb")
    from transformers.trainer_utils import HPSearchBackend

    from dsd.integrations.huggingface import DSDTrainerCallback

    x, y = dataset()
    output = tmp_path / "hf"
    earlier = output / "checkpoint-10"  # an earlier run's, in the same output_dir
    earlier.mkdir(parents=True)
    args = transformers.TrainingArguments(
        output_dir=str(output), per_device_train_batch_size=BATCH, num_train_epochs=5, optim="sgd",
        save_strategy="steps", save_steps=10, report_to=[], use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    rows = [{"x": a, "labels": b} for a, b in zip(x, y, strict=True)]
    trainer = transformers.Trainer(
        model_init=Classifier, args=args, train_dataset=rows, callbacks=[DSDTrainerCallback(RECIPE)]
    )
    trainer.hp_search_backend = HPSearchBackend.WANDB
    for seed in (0, 1):
        run = wandb.init(mode="disabled")
        trainer.train(trial={"seed": seed})
        for step in (10, 20):
            saved = torch.load(output / f"run-{run.id}" / f"checkpoint-{step}" / "dsd.pt", weights_only=True)
            assert saved["global_step"] == step
        wandb.finish()
    assert not any(earlier.iterdir())
