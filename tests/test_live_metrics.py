"""The Copilot measured in every evaluation Trainer runs during training, and the best Copilot kept: checked against
the offline recipe on the same items, and against an uninterrupted run and the saved checkpoints."""

import pytest
import torch
from conftest import qa_examples, qa_tokenizer, tiny_pilot
from safetensors.torch import load_file
from test_evaluation import FMT
from transformers import Trainer, TrainingArguments

from hf_copilot import CopilotCallback, CopilotMetrics, CopilotModel
from hf_copilot.recipes.diagnostics import teacher_forced_records
from hf_copilot.recipes.prompts import encode_example

METRICS = ("heldout_ratio", "loss", "zero_loss", "pilot_accuracy", "rectified_accuracy", "tokens_fixed",
           "tokens_broken", "tokens")


@pytest.fixture(scope="module")
def tokenizer():
    return qa_tokenizer()


def rows(tokenizer, examples):
    return [encode_example(example, tokenizer, FMT, 256) for example in examples]


def collate(batch):
    """Right padding, as the recipe's teacher-forced batches have it."""
    width = max(len(row["input_ids"]) for row in batch)
    return {name: torch.tensor([row[name] + [value] * (width - len(row[name])) for row in batch])
            for name, value in (("input_ids", 0), ("attention_mask", 0), ("labels", -100))}


def trainer_for(tmp_path, tokenizer, callback, pilot, **overrides):
    fields = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=4,
                  learning_rate=3e-3, logging_steps=1, eval_strategy="steps", eval_steps=2, save_strategy="no",
                  report_to=[], use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    fields.update(overrides)
    trainer = Trainer(model=pilot, args=TrainingArguments(**fields), train_dataset=rows(tokenizer, qa_examples(12)),
                      eval_dataset=rows(tokenizer, qa_examples(7, start=20)), data_collator=collate)
    callback.attach(trainer)
    return trainer


def evaluations(trainer):
    return [entry for entry in trainer.state.log_history if "eval_loss" in entry]


def test_each_evaluation_reports_what_the_offline_recipe_measures(tmp_path, tokenizer):
    pilot = tiny_pilot("llama")
    copilot = CopilotModel.from_pilot(pilot, num_hidden_layers=2)
    callback = CopilotCallback(copilot, batch_size=4, learning_rate=3e-3, eval_lam=0.7, eval_space="logits")
    trainer = trainer_for(tmp_path, tokenizer, callback, pilot)
    trainer.train()

    entries = evaluations(trainer)
    assert [entry["step"] for entry in entries] == [2, 4]
    assert all(f"eval_copilot_{name}" in entry for entry in entries for name in METRICS)
    # The last evaluation saw the final Pilot and Copilot: the recipe on the same items gives the same numbers.
    recipe = CopilotMetrics(copilot, lam=0.7, space="logits")
    for record in teacher_forced_records(pilot.eval(), tokenizer, qa_examples(7, start=20), FMT, batch_size=3):
        recipe.add(record)
    expected = recipe.results()
    for name in METRICS:
        assert entries[-1][f"eval_copilot_{name}"] == pytest.approx(expected[name], rel=1e-5, abs=1e-7), name
    assert entries[0]["eval_copilot_tokens"] == expected["tokens"]
    # In the training log: how well the Copilot fits the log it trains on, one number per entry.
    fits = [entry["copilot_fit_ratio"] for entry in trainer.state.log_history if "copilot_fit_ratio" in entry]
    assert len(fits) == 4 and all(0 < fit < 2 for fit in fits)


def test_metrics_off_and_without_evaluation(tmp_path, tokenizer):
    pilot = tiny_pilot("llama")
    callback = CopilotCallback(CopilotModel.from_pilot(pilot, num_hidden_layers=2), batch_size=4, eval_metrics=False)
    trainer = trainer_for(tmp_path / "off", tokenizer, callback, pilot)
    trainer.train()
    assert evaluations(trainer) and not any(key.startswith("eval_copilot") for entry in evaluations(trainer)
                                            for key in entry)
    assert callback.evaluation is None and callback.tap is None  # no hooks left on the Pilot
    assert not pilot._forward_hooks and not pilot._forward_pre_hooks


def run_keeping_the_best(tmp_path, tokenizer, resume=None):
    pilot = tiny_pilot("llama")
    copilot = CopilotModel.from_pilot(pilot, num_hidden_layers=2)
    # No warm-up and a learning rate at which the held-out ratio does not improve at every evaluation.
    callback = CopilotCallback(copilot, batch_size=4, learning_rate=5e-3, save_mistake_log=True, warmup_ratio=0.0,
                               load_best_at_end=True)
    trainer = trainer_for(tmp_path, tokenizer, callback, pilot, max_steps=6, eval_steps=1, save_strategy="steps",
                          save_steps=1)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, callback, copilot


def test_the_best_copilot_is_kept_saved_and_survives_a_resume(tmp_path, tokenizer):
    trainer, callback, copilot = run_keeping_the_best(tmp_path / "full", tokenizer)
    ratios = {entry["step"]: entry["eval_copilot_heldout_ratio"] for entry in evaluations(trainer)}
    best_step = min(ratios, key=ratios.get)
    assert (callback.best.step, callback.best.value) == (best_step, ratios[best_step])
    assert best_step < 6, "the ratio improved at every step: this run does not exercise keeping an earlier state"
    # The Copilot in memory and the one saved at the end are the state evaluated at the best step (saved there).
    at_best = load_file(tmp_path / "full" / f"checkpoint-{best_step}" / "copilot" / "model.safetensors")
    last = load_file(tmp_path / "full" / "checkpoint-6" / "copilot" / "model.safetensors")
    final = load_file(tmp_path / "full" / "copilot" / "model.safetensors")
    for key, tensor in copilot.state_dict().items():
        torch.testing.assert_close(tensor, at_best[key])
        torch.testing.assert_close(final[key], at_best[key])
    assert any(not torch.equal(last[key], at_best[key]) for key in last)

    # Resumed after the best step, a fresh run ends with the same best Copilot.
    resume = tmp_path / "full" / f"checkpoint-{best_step + 1}"
    _, resumed_callback, resumed = run_keeping_the_best(tmp_path / "full", tokenizer, resume=str(resume))
    assert (resumed_callback.best.step, resumed_callback.best.value) == (best_step, pytest.approx(ratios[best_step]))
    for key, tensor in resumed.state_dict().items():
        torch.testing.assert_close(tensor, at_best[key])


def test_bad_options_are_refused_before_training():
    copilot = CopilotModel.from_pilot(tiny_pilot("llama"), num_hidden_layers=2)
    with pytest.raises(ValueError, match="best_metric='accuracy'"):
        CopilotCallback(copilot, best_metric="accuracy", load_best_at_end=True)
    with pytest.raises(ValueError, match="keep eval_metrics=True"):
        CopilotCallback(copilot, eval_metrics=False, load_best_at_end=True)
    with pytest.raises(ValueError, match="eval_space"):
        CopilotCallback(copilot, eval_space="log")
    with pytest.raises(ValueError, match="lam"):
        CopilotCallback(copilot, eval_lam=-1)


def test_keeping_the_best_without_any_evaluation_warns_and_keeps_the_last_state(tmp_path, tokenizer):
    pilot = tiny_pilot("llama")
    copilot = CopilotModel.from_pilot(pilot, num_hidden_layers=2)
    callback = CopilotCallback(copilot, batch_size=4, load_best_at_end=True)
    trainer = trainer_for(tmp_path, tokenizer, callback, pilot, eval_strategy="no")
    with pytest.warns(RuntimeWarning, match="no evaluation of this run reported eval_copilot_heldout_ratio"):
        trainer.train()
    saved = load_file(tmp_path / "copilot" / "model.safetensors")
    for key, tensor in copilot.state_dict().items():
        torch.testing.assert_close(saved[key], tensor)
    assert copilot.correction_head.weight.abs().sum() > 0  # it trained, and that last state is what was kept
