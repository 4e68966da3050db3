"""DSD for the Hugging Face `Trainer`: a `TrainerCallback` that follows a recipe.

    trainer = Trainer(model, args, train_dataset=..., callbacks=[DSDTrainerCallback([
        {"kind": "dense", "epochs": 2, "lr": 5e-5},
        {"kind": "sparse", "epochs": 1, "lr": 5e-5, "sparsity": 0.5},
        {"kind": "redense", "epochs": 1},
    ])])

Set `num_train_epochs` to the recipe's total. The callback sets each step's learning rate after the Trainer's
scheduler has run, and again before the next step (so `lr_scheduler_type` does not matter to training,
`reduce_lr_on_plateau` included; the Trainer's own `learning_rate` log
column shows its scheduler, `dsd_lr` the rate applied), stops training when the recipe is done, writes its
step count and masks as `dsd.pt` into every checkpoint folder (a `hyperparameter_search` trial's too) and
reads them back when training resumes from one (`output_dir/checkpoint-N`, or the folder `TrainingArguments.resume_from_checkpoint` names: the Trainer does
not tell callbacks the folder given to `train()`), refusing masks that do not fit the restored weights, and adds `dsd_lr`, `dsd_sparsity` (measured) and `dsd_phase` of the step just taken to the Trainer's log
history (with `logging_strategy="steps"`).
"""

from __future__ import annotations

import glob
import json
import math
import os

import torch
from transformers import TrainerCallback

from dsd.core.masks import unpack_mask, unwrapped
from dsd.integrations._recipe import RecipeCallback

STATE_FILE = "dsd.pt"
TRAINER_STATE = "trainer_state.json"  # what the Trainer writes into every checkpoint before on_save


def saved_checkpoint(args, state) -> str:
    """The folder the Trainer has just saved `checkpoint-<step>` in. Under `hyperparameter_search` that is in the
    trial's own run folder, `output_dir/<hp_name(trial)>` or `output_dir/run-<trial id>`; callbacks are not told
    the trial id, so it is the newest such checkpoint of this trial's parameters."""
    name = f"checkpoint-{state.global_step}"
    if state.trial_name is not None:  # hp_name's run folder
        return os.path.join(args.output_dir, state.trial_name, name)
    if state.trial_params is None:  # no search
        return os.path.join(args.output_dir, name)
    pattern = os.path.join(glob.escape(args.output_dir), "*", name, TRAINER_STATE)
    params = same_in_json(state.trial_params)
    found = [path for path in glob.glob(pattern) if saved_trial_params(path) == params]
    if not found:
        raise FileNotFoundError(f"{pattern}: no checkpoint of this trial's, where the Trainer saves one")
    return os.path.dirname(max(found, key=os.path.getmtime))


def saved_trial_params(path: str):
    with open(path, encoding="utf-8") as file:
        return json.load(file).get("trial_params")


def same_in_json(value):
    """`value` as read back from the Trainer's JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


def masks_fit(model: torch.nn.Module, pruner: dict | None) -> bool:
    """Weights saved in a sparse phase are exactly zero where its masks prune: a DSD state whose pruned entries
    hold nonzero weights belongs to another checkpoint than the one the model was restored from."""
    if not pruner or not pruner.get("active", True):
        return True
    params = dict(unwrapped(model).named_parameters())  # the names the masks were saved under
    for name, shape in pruner["shapes"].items():
        if name not in params or list(params[name].shape) != list(shape):
            return False
        kept = unpack_mask(pruner["masks"][name], shape).to(params[name].device)
        if params[name].detach()[~kept].any():
            return False
    return True


class DSDTrainerCallback(RecipeCallback, TrainerCallback):
    logged: dict | None = None  # the values of the step being taken, for the next log
    untrained: dict | None = None  # the model before a step taken after the recipe's end, put back after it

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kw):
        try:
            batches = len(train_dataloader)
        except TypeError:  # an IterableDataset without __len__
            raise ValueError(
                "DSDTrainerCallback: the recipe counts epochs, but the train dataloader has no length; "
                "give the Trainer a dataset with a length"
            ) from None
        steps = math.ceil(batches / args.gradient_accumulation_steps)
        self.start(model, optimizer, steps)
        if state.global_step > 0:  # resumed: the Trainer loaded checkpoint-<global_step>
            folder = args.resume_from_checkpoint  # the Trainer does not pass on the folder given to train()
            if not isinstance(folder, str):
                folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            path = os.path.join(folder, STATE_FILE)
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"{path}: resumed at step {state.global_step} without the DSD state (a checkpoint outside "
                    "output_dir: name it in TrainingArguments.resume_from_checkpoint too)"
                )
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if not masks_fit(model, saved.get("pruner")):
                raise ValueError(
                    f"{path}: its masks do not fit the weights resumed (the DSD state of another run?)"
                )
            self.driver.load_state_dict(saved)

    def on_step_begin(self, args, state, control, model=None, **kw):
        # a finished run resumed (a requeued job): the Trainer takes a step before it stops
        if self.driver.done:
            self.untrained = {name: value.clone() for name, value in model.state_dict().items()}
        # again: a ReduceLROnPlateau scheduler steps after evaluation, past on_step_end's LR
        self.driver._set_lr()
        every = state.logging_steps or 1
        if args.logging_strategy == "steps" and (state.global_step + 1) % every == 0:  # this step will log
            driver = self.driver
            self.logged = {"dsd_lr": driver.lr, "dsd_sparsity": driver.sparsity(), "dsd_phase": driver.index}

    def on_step_end(self, args, state, control, model=None, **kw):
        if self.untrained is not None:  # that step trained without the recipe (dense, at a stale LR): undone
            model.load_state_dict(self.untrained)
            self.untrained = None
        self.driver.step()
        if self.driver.done:
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kw):
        self.warn_if_unfinished()

    def on_save(self, args, state, control, **kw):
        if args.should_save:  # the processes the Trainer saves from: one per node with save_on_each_node
            torch.save(self.driver.state_dict(), os.path.join(saved_checkpoint(args, state), STATE_FILE))

    def on_log(self, args, state, control, logs=None, **kw):
        if self.logged and state.log_history:  # the values of the step just taken
            state.log_history[-1].update(self.logged)
            if logs is not None:
                logs.update(self.logged)
            self.logged = None
