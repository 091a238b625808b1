import pytest
import torch
from conftest import DEVICES, VOCAB, tiny_pilot
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_copilot import (PAPER_LORA, CopilotCallback, CopilotModel, CopilotTrainingConfig, CopilotUpdater, MistakeLog,
                        train_copilot)
from hf_copilot.copilot_checkpoint import usable_copilot_state

SEQ = 16


def pattern_dataset(n=32, seed=0):
    """Sequences that count upwards modulo a small range from a random start: easy to learn, with prompt masking."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        start = int(torch.randint(3, VOCAB - SEQ, (1,), generator=gen))
        ids = torch.arange(start, start + SEQ)
        labels = ids.clone()
        labels[:3] = -100  # a "prompt" the Pilot is not trained on
        rows.append({"input_ids": ids, "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": labels})
    return rows


def trainer_args(tmp_path, **overrides):
    fields = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=6, learning_rate=1e-3,
                  logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                  dataloader_num_workers=0)
    fields.update(overrides)
    return TrainingArguments(**fields)


def run(tmp_path, callback=None, pilot=None, args=None, **trainer_kwargs):
    pilot = pilot or tiny_pilot("llama")
    trainer = Trainer(model=pilot, args=args or trainer_args(tmp_path), train_dataset=pattern_dataset(),
                      **trainer_kwargs)
    if callback is not None:
        callback.attach(trainer)
    trainer.train()
    return trainer


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_pilot_training_is_untouched_by_the_callback(tmp_path, kind):
    """Bit for bit. The GPT2 case draws random numbers on both sides: a Pilot with dropout, and a LoRA Copilot with
    dropout built after the Trainer seeded the generators."""
    plain = run(tmp_path / "plain", pilot=tiny_pilot(kind)).model
    pilot = tiny_pilot(kind)
    trainer = Trainer(model=pilot, args=trainer_args(tmp_path / "joint"), train_dataset=pattern_dataset())
    copilot = CopilotModel.from_pilot(pilot, num_hidden_layers=2, lora=PAPER_LORA if kind == "gpt2" else None)
    callback = CopilotCallback(copilot, batch_size=4).attach(trainer)
    trainer.train()
    assert callback.updater.updates == 6
    for (name, a), b in zip(plain.state_dict().items(), trainer.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_two_callbacks_of_one_name_are_refused_before_any_step(tmp_path):
    first, second = (CopilotCallback(CopilotModel.from_pilot(tiny_pilot("llama"), num_hidden_layers=layers))
                     for layers in (2, 3))
    trainer = Trainer(model=tiny_pilot("llama"), args=trainer_args(tmp_path), train_dataset=pattern_dataset(),
                      callbacks=[first, second])
    with pytest.raises(ValueError, match="Two CopilotCallbacks on this Trainer are named 'copilot'"):
        trainer.train()
    assert trainer.state.global_step == 0 and not (tmp_path / "copilot").exists()


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_copilot_learns_the_errors_of_a_fixed_pilot(tmp_path, device, precision):
    """With a frozen Pilot (learning rate 0) its errors are a fixed function of what the Copilot sees; so in mixed
    precision (the Copilot's update runs under the Trainer's autocast; in fp16 with a loss scale) and on a GPU."""
    copilot = CopilotModel.from_pilot(tiny_pilot("llama"), num_hidden_layers=2)
    callback = CopilotCallback(copilot, batch_size=8, learning_rate=3e-3, warmup_ratio=0.0, updates_per_step=4)
    args = trainer_args(tmp_path, learning_rate=0.0, max_steps=25, bf16=precision == "bf16",
                        fp16=precision == "fp16", use_cpu=device == "cpu")
    trainer = run(tmp_path, callback, args=args)
    assert callback.updater.scaler.is_enabled() == (precision == "fp16")
    assert callback.updater.skipped_updates == 0
    assert {p.device.type for p in copilot.parameters()} == {device}
    assert {p.dtype for p in copilot.parameters()} == {torch.float32}, "master weights stay fp32"
    losses = [h["copilot_loss"] for h in trainer.state.log_history if "copilot_loss" in h]
    assert len(losses) == 25
    assert losses[-1] < 0.7 * losses[0]
    zero_predictor = trainer.state.log_history[-2]["copilot_log_error_norm"]
    assert losses[0] == pytest.approx(zero_predictor, rel=0.2)


def test_records_one_entry_per_micro_batch_and_none_during_evaluation(tmp_path):
    copilot = CopilotModel.from_pilot(tiny_pilot("llama"), num_hidden_layers=2)
    callback = CopilotCallback(copilot, batch_size=4, log_rounds=1000)
    args = trainer_args(tmp_path, gradient_accumulation_steps=3, max_steps=2, eval_strategy="steps", eval_steps=1,
                        per_device_eval_batch_size=4)
    run(tmp_path, callback, args=args, eval_dataset=pattern_dataset(8, seed=1))
    assert len(callback.mistake_log) == 6  # 2 steps x 3 micro-batches, evaluation not recorded
    assert sorted(set(callback.mistake_log.steps)) == [1, 2]


def test_no_duplicate_records_with_activation_checkpointing(tmp_path):
    copilot = CopilotModel.from_pilot(tiny_pilot("llama"), num_hidden_layers=2)
    callback = CopilotCallback(copilot, batch_size=4)
    run(tmp_path, callback, args=trainer_args(tmp_path, activation_checkpointing=True, max_steps=3))
    assert len(callback.mistake_log) == 3


def test_metrics_reach_the_log_history(tmp_path):
    copilot = CopilotModel.from_pilot(tiny_pilot("llama"), num_hidden_layers=2)
    trainer = run(tmp_path, CopilotCallback(copilot, batch_size=4))
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 6
    for entry in logged:
        for key in ["copilot_loss", "copilot_learning_rate", "copilot_log_tokens", "copilot_log_bytes",
                    "copilot_log_error_norm", "copilot_log_dropped_mass"]:
            assert key in entry, key
    assert (tmp_path / "copilot" / "model.safetensors").exists()


def test_a_run_shorter_than_logging_steps_still_reports_the_copilot(tmp_path, monkeypatch):
    """The final summary entry carries the Copilot's metrics as it carries Trainer's own: the Copilot's total time
    next to train_runtime, and copilot_train_loss (the mean over the run) next to train_loss."""
    losses = []
    update = CopilotUpdater.step
    monkeypatch.setattr(CopilotUpdater, "step", lambda self, log: losses.append(update(self, log)) or losses[-1])
    callback = CopilotCallback(CopilotModel.from_pilot(tiny_pilot("llama"), num_hidden_layers=2), batch_size=4)
    trainer = run(tmp_path, callback, args=trainer_args(tmp_path, max_steps=4, logging_steps=10))
    summary = trainer.state.log_history[-1]
    assert "train_runtime" in summary and "copilot_loss" not in summary  # per-step keys stay in per-step entries
    assert len(losses) == 4 and summary["copilot_train_loss"] == pytest.approx(sum(losses) / 4)
    assert summary["copilot_seconds"] == pytest.approx(callback.seconds)
    assert 0 < summary["copilot_seconds"] < summary["train_runtime"]


def test_bad_callback_options_fail_at_construction():
    copilot = CopilotModel.from_pilot(tiny_pilot("llama"), num_hidden_layers=2)
    cases = [(dict(lr_scheduler_type="cosin"), "lr_scheduler_type='cosin' is not a transformers schedule"),
             (dict(log_device="tpu"), r"log_device='tpu'\) is not a torch device"),
             (dict(log_rounds=0), "log_rounds=0"), (dict(log_max_bytes=0), "log_max_bytes=0"),
             (dict(top_k=0), "top_k=0")]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            CopilotCallback(copilot, **options)


class RecordingReporter(TrainerCallback):
    """Stands in for TensorBoard / W&B: keeps a copy of every log it is shown."""

    def __init__(self):
        self.seen = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs))


@pytest.mark.parametrize("attached", [True, False])
def test_reporters_see_the_metrics_in_the_same_log_when_attached(tmp_path, attached):
    copilot = CopilotModel.from_pilot(tiny_pilot("llama"), num_hidden_layers=2)
    callback, reporter = CopilotCallback(copilot, batch_size=4), RecordingReporter()
    # The reporter is installed before the Copilot's callback, as Trainer installs TensorBoard / W&B.
    trainer = Trainer(model=tiny_pilot("llama"), args=trainer_args(tmp_path), train_dataset=pattern_dataset(),
                      callbacks=[reporter] + ([] if attached else [callback]))
    if attached:
        callback.attach(trainer)
        callback.attach(trainer)  # attaching twice keeps one copy
        assert trainer.callback_handler.callbacks.count(callback) == 1
    trainer.train()
    training_logs = [logs for logs in reporter.seen if "loss" in logs]
    assert len(training_logs) == 6
    assert all(("copilot_loss" in logs) == attached for logs in training_logs)


def _cross_entropy(outputs, labels, num_items_in_batch=None):
    logits = outputs.logits[:, :-1].flatten(0, 1)
    return torch.nn.functional.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=-100)


@pytest.mark.parametrize("setting", ["label_smoothing_factor", "compute_loss_func"])
def test_settings_that_hide_the_labels_fail_with_a_fix(tmp_path, setting):
    """Trainer keeps `labels` from the model under either setting, so the Pilot's errors cannot be computed."""
    copilot = CopilotModel.from_pilot(tiny_pilot("llama"), num_hidden_layers=2)
    smoothing = {"label_smoothing_factor": 0.1} if setting == "label_smoothing_factor" else {}
    loss = {"compute_loss_func": _cross_entropy} if setting == "compute_loss_func" else {}
    with pytest.raises(RuntimeError, match=f"without `labels`.*{setting}"):
        run(tmp_path, CopilotCallback(copilot), args=trainer_args(tmp_path, **smoothing), **loss)


def test_mismatched_copilot_fails_before_training(tmp_path):
    copilot = CopilotModel.from_pilot(tiny_pilot("llama", vocab_size=VOCAB + 8), num_hidden_layers=2)
    with pytest.raises(ValueError, match="does not fit the Pilot"):
        run(tmp_path, CopilotCallback(copilot))


@pytest.mark.slow
@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_resume_gives_the_same_copilot_as_an_uninterrupted_run(tmp_path, fp16):
    def callback():
        return CopilotCallback(CopilotModel.from_pilot(tiny_pilot("llama"), num_hidden_layers=2), batch_size=4,
                               save_mistake_log=True)

    full = callback()
    run(tmp_path / "full", full, args=trainer_args(tmp_path / "full", max_steps=6, fp16=fp16))
    interrupted = tmp_path / "resumed"
    run(interrupted, callback(), args=trainer_args(interrupted, max_steps=6, save_strategy="steps", save_steps=3,
                                                   fp16=fp16))
    assert (interrupted / "checkpoint-3" / "copilot" / "model.safetensors").exists()
    resumed = callback()
    trainer = Trainer(model=tiny_pilot("llama"), args=trainer_args(interrupted, max_steps=6, fp16=fp16),
                      train_dataset=pattern_dataset(), callbacks=[resumed])
    trainer.train(resume_from_checkpoint=str(interrupted / "checkpoint-3"))
    for (name, a), b in zip(full.copilot.state_dict().items(), resumed.copilot.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_a_resume_with_another_number_of_processes_says_so(tmp_path):
    def callback():
        return CopilotCallback(CopilotModel.from_pilot(tiny_pilot("llama"), num_hidden_layers=2), batch_size=4)

    run(tmp_path, callback(), args=trainer_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2))
    saved = tmp_path / "checkpoint-2" / "copilot"
    # Saved by one process, resumed by two: what each rank of a two-process run would ask for.
    with pytest.raises(ValueError, match=r"holds the Copilot state of 1 process\(es\), but this run has 2"):
        usable_copilot_state(tmp_path / "checkpoint-2", "copilot", world_size=2, global_step=2)
    # Saved by two processes (a second rank's files beside the first's), resumed by one.
    for name in ("copilot_training_state_rank{}.pt", "checksums_rank{}.json"):
        (saved / name.format(1)).write_bytes((saved / name.format(0)).read_bytes())
    trainer = Trainer(model=tiny_pilot("llama"), args=trainer_args(tmp_path, max_steps=4),
                      train_dataset=pattern_dataset(), callbacks=[callback()])
    with pytest.raises(ValueError, match=r"holds the Copilot state of 2 process\(es\), but this run has 1.*"
                                         r"resume_from=False"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_a_resume_without_the_mistake_log_says_it_is_not_exact(tmp_path, caplog):
    def callback():
        return CopilotCallback(CopilotModel.from_pilot(tiny_pilot("llama"), num_hidden_layers=2), batch_size=4)

    run(tmp_path, callback(), args=trainer_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2))
    trainer = Trainer(model=tiny_pilot("llama"), args=trainer_args(tmp_path, max_steps=4),
                      train_dataset=pattern_dataset(), callbacks=[callback()])
    with caplog.at_level("WARNING", logger="hf_copilot.callback"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert "without its Mistake Log" in caplog.text and "save_mistake_log=True" in caplog.text


@pytest.mark.slow
def test_offline_training_from_a_saved_log(tmp_path):
    copilot = CopilotModel.from_pilot(tiny_pilot("llama"), num_hidden_layers=2)
    callback = CopilotCallback(copilot, batch_size=4, learning_rate=1e-12)
    run(tmp_path, callback, args=trainer_args(tmp_path, learning_rate=0.0))
    callback.mistake_log.save(tmp_path / "log")
    log = MistakeLog.load(tmp_path / "log")
    fresh = CopilotModel.from_pilot(tiny_pilot("llama"), num_hidden_layers=2)
    losses = train_copilot(fresh, log, num_updates=30, progress=False, learning_rate=3e-3, warmup_ratio=0.0,
                           batch_size=8)
    assert len(losses) == 30 and sum(losses[-5:]) < 0.8 * sum(losses[:5])
    whole_log = CopilotUpdater(fresh, CopilotTrainingConfig(batch_size=10_000), total_updates=2)
    whole_log.step(log)
    whole_log.step(log)
    assert whole_log.tokens == 2 * log.stats()["tokens"]  # every sequence drawn twice; padding not counted


@pytest.mark.slow
@pytest.mark.parametrize("log_rounds", [128, 2])
def test_replaying_a_saved_log_round_by_round_reproduces_joint_training(tmp_path, log_rounds):
    """MistakeLog.until(step) is the log as it stood at that step, so an offline replay equals the joint run; with
    max_rounds it is the log of a joint run whose ring held fewer rounds."""
    recorded = CopilotCallback(CopilotModel.from_pilot(tiny_pilot("llama"), num_hidden_layers=2), batch_size=3,
                               save_mistake_log=True, seed=5)
    run(tmp_path / "recorded", recorded)
    joint = CopilotCallback(CopilotModel.from_pilot(tiny_pilot("llama"), num_hidden_layers=2), batch_size=3,
                            log_rounds=log_rounds, seed=5)
    run(tmp_path / "joint", joint)
    log = MistakeLog.load(tmp_path / "recorded" / "copilot" / "mistake_log")
    assert sorted(set(log.steps)) == list(range(1, 7))
    assert log.until(2).steps == [1, 2] and log.until(2).bytes < log.bytes
    assert log.until(5, max_rounds=2).steps == [4, 5]
    thinned = log.until(6, every=2)  # the first round and every second one after it: half the data
    assert thinned.steps == [1, 3, 5] and thinned.bytes == sum(log.until(s, max_rounds=1).bytes for s in (1, 3, 5))
    assert log.until(6, every=2, max_rounds=2).steps == [3, 5]
    replayed = CopilotModel.from_pilot(tiny_pilot("llama"), num_hidden_layers=2)
    updater = CopilotUpdater(replayed, CopilotTrainingConfig(batch_size=3, seed=5), total_updates=6)
    for step in sorted(set(log.steps)):
        updater.step(log.until(step, max_rounds=log_rounds))
    for (name, a), b in zip(joint.copilot.state_dict().items(), replayed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    with pytest.raises(ValueError, match="no round at or before step 0"):
        log.until(0)
    with pytest.raises(ValueError, match="max_rounds and every must be positive"):
        log.until(3, max_rounds=0)
    with pytest.raises(ValueError, match="max_rounds and every must be positive"):
        log.until(3, every=0)


def test_seq2seq_trainer_with_a_t5_pilot(tmp_path):
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    pilot = tiny_pilot("t5")
    rows = []
    for row in pattern_dataset(16):
        rows.append({"input_ids": row["input_ids"][:8], "attention_mask": row["attention_mask"][:8],
                     "labels": row["input_ids"][8:].clone()})
    args = Seq2SeqTrainingArguments(**trainer_args(tmp_path).to_dict() | {"output_dir": str(tmp_path)})
    callback = CopilotCallback(CopilotModel.from_pilot(pilot, num_hidden_layers=2), batch_size=4)
    Seq2SeqTrainer(model=pilot, args=args, train_dataset=rows, callbacks=[callback]).train()
    assert len(callback.mistake_log) == 6 and callback.mistake_log.signature.kind == "encoder_decoder"
    assert callback.updater.updates == 6


def test_adam_epsilon_scales_the_steps_of_weakly_supported_head_rows(tmp_path):
    """With the default epsilon, one AdamW step moves every head row that has any gradient by about the learning
    rate; with a large epsilon a row moves in proportion to its gradient, so weakly supported rows barely move."""
    callback = CopilotCallback(CopilotModel.from_pilot(tiny_pilot("llama"), num_hidden_layers=2), batch_size=4)
    run(tmp_path, callback, args=trainer_args(tmp_path, learning_rate=0.0, max_steps=2))
    moved = {}
    for epsilon in (1e-8, 1.0):
        copilot = CopilotModel.from_pilot(tiny_pilot("llama"), num_hidden_layers=2)
        with torch.no_grad():  # a head that is not exactly zero, so that every row receives a gradient
            copilot.correction_head.weight.normal_(std=1e-3, generator=torch.Generator().manual_seed(0))
        before = copilot.correction_head.weight.detach().clone()
        config = CopilotTrainingConfig(learning_rate=1e-3, warmup_ratio=0.0, batch_size=8, adam_epsilon=epsilon,
                                       max_grad_norm=0.0, lr_scheduler_type="constant")
        CopilotUpdater(copilot, config, total_updates=1).step(callback.mistake_log)
        moved[epsilon] = (copilot.correction_head.weight.detach() - before).abs().amax(-1)
    quiet, loud = moved[1e-8].quantile(0.1), moved[1e-8].amax()
    assert quiet > 0.5e-3 and loud < 1.1e-3  # every row steps by about lr, whatever its gradient
    assert moved[1.0].quantile(0.1) < 0.1 * quiet  # weakly supported rows now barely move
    for bad in (dict(adam_epsilon=0.0), dict(learning_rate=-1.0)):
        with pytest.raises(ValueError, match="must be positive"):
            CopilotTrainingConfig(**bad)


def test_two_named_copilots_on_one_run_each_train_as_if_alone(tmp_path):
    def callback(name):
        return CopilotCallback(CopilotModel.from_pilot(tiny_pilot("llama"), num_hidden_layers=2), batch_size=4,
                               name=name, seed=3)

    alone = callback("big")
    run(tmp_path / "alone", alone)
    big, small = callback("big"), callback("small")
    trainer = Trainer(model=tiny_pilot("llama"), args=trainer_args(tmp_path / "both"), train_dataset=pattern_dataset())
    small.attach(trainer)
    big.attach(trainer)
    trainer.train()
    for (name, a), b in zip(alone.copilot.state_dict().items(), big.copilot.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    assert (tmp_path / "both" / "big" / "model.safetensors").exists()
    assert (tmp_path / "both" / "small" / "model.safetensors").exists()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all("big_loss" in entry and "small_loss" in entry and "copilot_loss" not in entry for entry in logged)


@pytest.mark.parametrize("update_every, max_steps", [(3, 7), (2, 6), (1, 5)])
def test_the_copilot_schedule_ends_with_its_last_update(tmp_path, update_every, max_steps):
    """Updates come after steps update_every, 2·update_every, ...: the cosine schedule is sized to that count, so
    the last update is the schedule's last step and the learning rate ends at 0."""
    callback = CopilotCallback(CopilotModel.from_pilot(tiny_pilot("llama"), num_hidden_layers=2), batch_size=4,
                               update_every=update_every, lr_scheduler_type="cosine", warmup_ratio=0.0)
    run(tmp_path, callback, args=trainer_args(tmp_path, max_steps=max_steps))
    updates = max_steps // update_every
    assert callback.updater.updates == updates
    assert callback.updater.scheduler.last_epoch == updates
    assert callback.updater.learning_rate == pytest.approx(0.0, abs=1e-12)
