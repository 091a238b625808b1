"""Scoring a Pilot with and without its Copilot, each checked against a slow, obviously-correct recomputation."""

import dataclasses
import math
import re

import pytest
import torch
from conftest import VOCAB, qa_examples, qa_tokenizer, tiny_pilot

from hf_copilot import CopilotConfig, CopilotLogitsProcessor, CopilotMetrics, CopilotModel
from hf_copilot.recipes import scoring
from hf_copilot.recipes.diagnostics import (ErrorRatios, first_error_ranks, heldout_error_ratio, heldout_error_ratios,
                                            record_mistake_log, teacher_forced_records)
from hf_copilot.recipes.scoring import Decoding, evaluate_decodings, generate_answers
from hf_copilot.recipes.finetune import finetune
from hf_copilot.recipes.prompts import encode_example
from hf_copilot.recipes.significance import sign_test_p_value
from hf_copilot.recipes.tasks import DEFAULT_FORMAT

FMT = dataclasses.replace(DEFAULT_FORMAT, max_new_tokens=12)


@pytest.fixture(scope="module")
def tokenizer():
    return qa_tokenizer()


def train(tmp_path_factory, tokenizer, steps):
    pilot = tiny_pilot("llama")
    copilot = CopilotModel.from_pilot(pilot, num_hidden_layers=2)
    finetune(pilot, tokenizer, qa_examples(12), FMT, tmp_path_factory.mktemp("ft"), copilot=copilot, max_steps=steps,
             batch_size=4, learning_rate=3e-3, progress=False, copilot_options=dict(batch_size=4))
    return pilot.eval(), copilot.eval()


@pytest.fixture(scope="module")
def early(tmp_path_factory, tokenizer):
    """A Pilot fine-tuned for a few steps: it has learnt to end some answers, not all."""
    return train(tmp_path_factory, tokenizer, steps=6)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):
    """A Pilot fine-tuned until it answers about half of the questions right, and the Copilot trained alongside."""
    return train(tmp_path_factory, tokenizer, steps=10)


def word_ids(tokenizer, text):
    vocab = tokenizer.get_vocab()
    return [vocab[word] for word in text.split()]


@torch.no_grad()
def slow_greedy_ids(pilot, tokenizer, example, max_new_tokens):
    """Batch of one, no padding, no cache: a full forward per new token, argmax, stop at EOS; the new token ids."""
    ids = word_ids(tokenizer, FMT.prompt(example))
    new = []
    while len(new) < max_new_tokens:
        logits = pilot(input_ids=torch.tensor([ids + new])).logits[0, -1]
        new.append(int(logits.argmax()))
        if new[-1] == tokenizer.eos_token_id:
            break
    return new


def slow_greedy(pilot, tokenizer, example, max_new_tokens):
    new = slow_greedy_ids(pilot, tokenizer, example, max_new_tokens)
    return tokenizer.decode(new, skip_special_tokens=True), new[-1] == tokenizer.eos_token_id


def test_greedy_answers_match_a_slow_loop_in_example_order(early, tokenizer):
    pilot, _ = early
    examples = qa_examples(8, start=12)
    lengths = [len(word_ids(tokenizer, FMT.prompt(example))) for example in examples]
    assert sorted(range(8), key=lengths.__getitem__) != list(range(8))  # batching really reorders them

    answers = generate_answers(pilot, tokenizer, examples, FMT, batch_size=2)
    reference = [slow_greedy(pilot, tokenizer, example, FMT.max_new_tokens) for example in examples]
    assert answers == [text for text, _ in reference]
    assert len(set(answers)) > 2  # distinct answers, so a permutation would be caught
    ended = [stopped for _, stopped in reference]
    assert any(ended) and not all(ended)  # both ways of stopping occur


def recount(answer: str, example) -> bool:
    """Hand-written scoring of DEFAULT_FORMAT: the first in-range "answerK" names the choice; else the first line."""
    if example.choices:
        for k in re.findall(r"answer(\d+)", answer.lower()):
            if 1 <= int(k) <= len(example.choices):
                return example.choices[int(k) - 1] == example.answer
        return False
    return answer.strip().split("\n")[0].strip().lower().rstrip(".") == example.answer.lower()


@pytest.mark.slow
def test_evaluate_decodings_counts_fixed_and_broken_against_the_pilot_alone(trained, tokenizer):
    pilot, copilot = trained
    noisy = noisy_copilot(pilot, copilot, 0.1)  # corrections large enough to both fix and break answers
    examples = qa_examples(8, start=12) + qa_examples(4)
    decodings = [Decoding(), Decoding(1.0, "logits"), Decoding(0.5, "probs"), Decoding(num_beams=2),
                 Decoding(1.0, "logits", 2)]
    rows = evaluate_decodings(pilot, tokenizer, examples, FMT, decodings, copilot=noisy, batch_size=3)

    assert [row["decoding"] for row in rows] == [
        "pilot greedy", "logits λ=1 greedy", "probs λ=0.5 greedy", "pilot beam2", "logits λ=1 beam2"]
    assert rows[0]["answers"] == generate_answers(pilot, tokenizer, examples, FMT, batch_size=5)
    baselines = {row["num_beams"]: [recount(a, ex) for a, ex in zip(row["answers"], examples)]
                 for row in rows if row["lam"] == 0}
    for row, decoding in zip(rows, decodings):
        assert (row["lam"], row["space"], row["num_beams"]) == (decoding.lam, decoding.space, decoding.num_beams)
        assert len(row["answers"]) == len(examples)
        mine, base = [recount(a, ex) for a, ex in zip(row["answers"], examples)], baselines[row["num_beams"]]
        assert row["total"] == len(examples)
        assert row["correct"] == sum(mine)
        assert row["accuracy"] == sum(mine) / len(examples)
        assert row["fixed"] == sum(m and not b for m, b in zip(mine, base))
        assert row["broken"] == sum(b and not m for m, b in zip(mine, base))
        if row["lam"]:  # the paired comparison with the Pilot alone, from the recounted items
            assert row["difference"] == (sum(mine) - sum(base)) / len(examples)
            assert row["p_value"] == sign_test_p_value(row["fixed"], row["broken"])
            assert row["interval"][0] <= row["difference"] <= row["interval"][1]
        else:
            assert (row["p_value"], row["difference"], row["interval"]) == (None, 0.0, None)
    assert any(row["fixed"] for row in rows) and any(row["broken"] for row in rows)  # the counts have teeth
    assert 0 < rows[0]["correct"] < len(examples)

    with pytest.raises(ValueError, match="no copilot was given"):
        evaluate_decodings(pilot, tokenizer, examples, FMT, [Decoding(), Decoding(0.5)])
    with pytest.raises(ValueError, match="probs λ=0.3 greedy"):
        generate_answers(pilot, tokenizer, examples, FMT, decoding=Decoding(0.3))


@torch.no_grad()
def reference_errors(pilot, copilot, tokenizer, examples):
    """Σ‖f − ℓ‖², Σ‖ℓ‖² and the token count, one unpadded example at a time, with dense errors throughout."""
    scores = reference_scores(pilot, copilot, tokenizer, examples)
    return scores["squared_error"], scores["squared_norm"], scores["tokens"]


@torch.no_grad()
def reference_scores(pilot, copilot, tokenizer, examples, lam=1.0, space="probs"):
    """reference_errors, and the answer tokens whose label is the argmax of the Pilot's logits and of the fused
    scores (softmax(z) + λf, or z + λf), one unpadded example at a time."""
    captured = {}
    hooks = [pilot.model.embed_tokens.register_forward_hook(lambda m, a, out: captured.__setitem__("x", out))]
    for index, layer in enumerate(pilot.model.layers):
        hooks.append(layer.register_forward_hook(
            lambda m, a, out, index=index: captured.__setitem__(index, out[0] if isinstance(out, tuple) else out)))
    scores = dict.fromkeys(("squared_error", "squared_norm", "tokens", "pilot_right", "rectified_right", "fixed",
                            "broken"), 0)
    try:
        for example in examples:
            prompt = word_ids(tokenizer, FMT.prompt(example))
            target = word_ids(tokenizer, FMT.target(example)) + [tokenizer.eos_token_id]
            ids = torch.tensor([prompt + target])
            logits = pilot(input_ids=ids).logits[0].double()
            h_mean = sum(captured[i] for i in range(len(pilot.model.layers))) / len(pilot.model.layers)
            length = ids.shape[1]
            errors = torch.zeros(length, VOCAB, dtype=torch.float64)
            valid = torch.zeros(length, dtype=torch.bool)
            for t in range(len(prompt) - 1, length - 1):  # logits at t predict token t + 1, a target token
                errors[t] = -torch.softmax(logits[t], -1)
                errors[t, ids[0, t + 1]] += 1.0
                valid[t] = True
            shifted = torch.cat([torch.zeros(1, VOCAB, dtype=torch.float64), errors[:-1]])
            corrections = copilot(pilot_hidden_states=h_mean, pilot_input_states=captured["x"],
                                  input_errors=shifted[None].float(),
                                  pilot_logits=logits[None].float()).corrections[0].double()
            scores["squared_error"] += float((corrections - errors)[valid].pow(2).sum())
            scores["squared_norm"] += float(errors[valid].pow(2).sum())
            scores["tokens"] += int(valid.sum())
            for t in valid.nonzero().flatten().tolist():
                fused = (torch.softmax(logits[t], -1) + lam * corrections[t] if space == "probs"
                         else logits[t] + lam * corrections[t])
                pilot_right = int(logits[t].argmax()) == int(ids[0, t + 1])
                rectified_right = int(fused.argmax()) == int(ids[0, t + 1])
                scores["pilot_right"] += pilot_right
                scores["rectified_right"] += rectified_right
                scores["fixed"] += rectified_right and not pilot_right
                scores["broken"] += pilot_right and not rectified_right
    finally:
        for hook in hooks:
            hook.remove()
    return scores


def noisy_copilot(pilot, copilot, scale):
    """The trained Copilot with a random correction head of the given scale (0: it corrects nothing)."""
    noisy = CopilotModel.from_pilot(pilot, num_hidden_layers=2).eval()
    noisy.load_state_dict(copilot.state_dict())
    torch.manual_seed(2)
    with torch.no_grad():
        noisy.correction_head.weight.normal_(0, scale) if scale else noisy.correction_head.weight.zero_()
    return noisy


@pytest.mark.slow
def test_screened_greedy_decodings_equal_a_full_rectified_generate(trained, tokenizer, monkeypatch):
    """evaluate_decodings screens every rectified greedy decoding in one Pilot pass and regenerates only the rows
    that leave the Pilot's path; each must equal generate() with the processor over all rows."""
    pilot, copilot = trained
    noisy = noisy_copilot(pilot, copilot, 0.1)
    examples = qa_examples(8, start=12) + qa_examples(4)
    decodings = [Decoding(1.0, "logits"), Decoding(0.3, "logits"), Decoding(0.5, "probs"), Decoding(2.0, "logits")]
    regenerated = []
    real_generate_answers = scoring.generate_answers

    def counting(*args, **kwargs):
        regenerated.append(len(args[2]))
        return real_generate_answers(*args, **kwargs)

    monkeypatch.setattr(scoring, "generate_answers", counting)
    rows = evaluate_decodings(pilot, tokenizer, examples, FMT, decodings, copilot=noisy, batch_size=3)
    monkeypatch.undo()

    pilot_answers = real_generate_answers(pilot, tokenizer, examples, FMT, batch_size=3)
    changed = 0
    for row, decoding in zip(rows, decodings):
        full = real_generate_answers(pilot, tokenizer, examples, FMT, copilot=noisy, decoding=decoding, batch_size=3)
        assert row["answers"] == full, decoding.name
        changed += sum(a != b for a, b in zip(full, pilot_answers))
    assert changed and sum(regenerated) < len(decodings) * len(examples)  # rows both left and kept the path

    regenerated.clear()
    monkeypatch.setattr(scoring, "generate_answers", counting)
    silent = evaluate_decodings(pilot, tokenizer, examples, FMT, decodings, copilot=noisy_copilot(pilot, copilot, 0),
                                batch_size=3)
    assert regenerated == []  # a Copilot that corrects nothing never leaves the Pilot's path
    assert all(row["answers"] == pilot_answers for row in silent)


def test_heldout_error_ratio_matches_a_dense_recomputation(trained, tokenizer):
    pilot, copilot = trained
    examples = qa_examples(7, start=20)  # 7 with batch_size=3: padded batches and a short last one
    result = heldout_error_ratio(pilot, copilot, tokenizer, examples, FMT, batch_size=3, top_k=VOCAB)
    squared_error, squared_norm, tokens = reference_errors(pilot, copilot, tokenizer, examples)
    assert result["tokens"] == tokens
    assert result["ratio"] == pytest.approx((squared_error / squared_norm) ** 0.5, rel=1e-5)
    assert result["copilot_rmse"] == pytest.approx((squared_error / tokens) ** 0.5, rel=1e-5)
    assert result["zero_rmse"] == pytest.approx((squared_norm / tokens) ** 0.5, rel=1e-5)
    assert abs(result["ratio"] - 1) > 1e-3  # the trained Copilot's corrections are not zero

    fresh = CopilotModel.from_pilot(pilot, num_hidden_layers=2)
    untrained = heldout_error_ratio(pilot, fresh, tokenizer, examples, FMT, batch_size=3, top_k=VOCAB)
    # Zero corrections: the Copilot's squared error is exactly the errors' own squared norm.
    assert untrained["ratio"] == 1.0
    assert untrained["zero_rmse"] == pytest.approx((squared_norm / tokens) ** 0.5, rel=1e-5)
    assert untrained["copilot_rmse"] == pytest.approx(untrained["zero_rmse"], rel=1e-6)

    # Several Copilots scored from one Pilot pass: each as if scored alone.
    both = heldout_error_ratios(pilot, {"trained": copilot, "fresh": fresh}, tokenizer, examples, FMT, batch_size=3,
                                top_k=VOCAB)
    assert both == {"trained": pytest.approx(result, rel=1e-6), "fresh": pytest.approx(untrained, rel=1e-6)}


def test_heldout_error_ratio_of_a_logit_residual_copilot_matches_a_dense_recomputation(trained, tokenizer):
    """The same trained weights read as a logit residual: scored from compact errors, equal to dense corrections
    softmax(z + g) − softmax(z) against dense errors."""
    pilot, copilot = trained
    residual = CopilotModel(CopilotConfig(**dict(copilot.config.to_dict(), correction="logit_residual"))).eval()
    residual.load_state_dict(copilot.state_dict())
    examples = qa_examples(7, start=20)
    result = heldout_error_ratio(pilot, residual, tokenizer, examples, FMT, batch_size=3, top_k=VOCAB)
    squared_error, squared_norm, tokens = reference_errors(pilot, residual, tokenizer, examples)
    assert result["tokens"] == tokens
    assert result["ratio"] == pytest.approx((squared_error / squared_norm) ** 0.5, rel=1e-5)
    assert abs(result["ratio"] - 1) > 1e-3


@pytest.mark.parametrize("correction, space", [("vocabulary", "probs"), ("vocabulary", "logits"),
                                               ("logit_residual", "probs")])
def test_copilot_metrics_match_a_dense_recomputation(trained, tokenizer, correction, space):
    """Every measure of CopilotMetrics, from padded teacher-forced batches and compact errors, equals the dense
    one-example-at-a-time recount, with a Copilot noisy enough to both fix and break tokens."""
    pilot, copilot = trained
    noisy = noisy_copilot(pilot, copilot, 0.3)
    if correction != "vocabulary":
        noisy = CopilotModel(CopilotConfig(**dict(noisy.config.to_dict(), correction=correction))).eval()
        noisy.load_state_dict(noisy_copilot(pilot, copilot, 3.0).state_dict())
    examples = qa_examples(7, start=20)
    metrics = CopilotMetrics(noisy, lam=0.7, space=space, top_k=VOCAB)
    for record in teacher_forced_records(pilot, tokenizer, examples, FMT, batch_size=3):
        metrics.add(record)
    result = metrics.results()
    reference = reference_scores(pilot, noisy, tokenizer, examples, lam=0.7, space=space)
    tokens = reference["tokens"]
    assert result["tokens"] == tokens
    assert result["heldout_ratio"] == pytest.approx((reference["squared_error"] / reference["squared_norm"]) ** 0.5,
                                                    rel=1e-5)
    assert result["loss"] == pytest.approx((reference["squared_error"] / tokens) ** 0.5, rel=1e-5)
    assert result["zero_loss"] == pytest.approx((reference["squared_norm"] / tokens) ** 0.5, rel=1e-5)
    assert result["pilot_accuracy"] == reference["pilot_right"] / tokens
    assert result["rectified_accuracy"] == reference["rectified_right"] / tokens
    assert (result["tokens_fixed"], result["tokens_broken"]) == (reference["fixed"], reference["broken"])
    assert reference["fixed"] + reference["broken"] > 0 and reference["pilot_right"] > 0


def test_recording_a_mistake_log_can_score_a_copilot_in_the_same_pass(trained, tokenizer):
    pilot, copilot = trained
    examples = qa_examples(7, start=20)
    seen = []
    ratios = ErrorRatios({"trained": copilot}, top_k=VOCAB)
    log = record_mistake_log(pilot, tokenizer, examples, FMT, batch_size=3, top_k=VOCAB,
                             on_record=lambda record: (seen.append(record.labels.shape[0]), ratios.add(record)))
    assert seen == [3, 3, 1] and log.rounds == 3  # every batch, each once
    squared_error, squared_norm, tokens = reference_errors(pilot, copilot, tokenizer, examples)
    result = ratios.results()["trained"]
    assert result["tokens"] == tokens
    assert result["ratio"] == pytest.approx((squared_error / squared_norm) ** 0.5, rel=1e-5)
    with pytest.raises(ValueError, match="no answer tokens"):
        ErrorRatios({"trained": copilot}).results()


@pytest.fixture(scope="module")
def tiny_run(trained, tokenizer):
    """evaluate_decodings on 12 items with a Copilot whose corrections both fix and break answers."""
    pilot, copilot = trained
    noisy = noisy_copilot(pilot, copilot, 0.1)
    examples = qa_examples(8, start=12) + qa_examples(4)
    decodings = [Decoding(), Decoding(0.5, "logits"), Decoding(1.0, "logits"), Decoding(1.0, "probs")]
    rows = evaluate_decodings(pilot, tokenizer, examples, FMT, decodings, copilot=noisy, batch_size=4)
    return pilot, noisy, examples, rows


def error_bars(container):
    """(x, low, high) of each vertical bar of an errorbar() container."""
    (segments,) = container.lines[2]
    return [(float(s[0][0]), float(min(s[:, 1])), float(max(s[:, 1]))) for s in segments.get_segments()]


def test_accuracy_plot_draws_differences_with_intervals_around_the_pilot_alone(tiny_run, tmp_path):
    from matplotlib.container import ErrorbarContainer

    from hf_copilot.recipes import plots

    *_, rows = tiny_run
    rendered = plots.plot_accuracy_vs_lambda(rows, tmp_path / "accuracy.png")
    assert rendered.path.stat().st_size > 1000
    axis = rendered.figure.axes[0]
    pilot = rows[0]
    (reference,) = [line for line in axis.lines if line.get_label().startswith("Pilot alone")]
    assert set(reference.get_ydata()) == {0}
    assert f"greedy {100 * pilot['accuracy']:.1f}% ({pilot['correct']}/{pilot['total']})" in reference.get_label()
    containers = {c.get_label(): c for c in axis.containers if isinstance(c, ErrorbarContainer)}
    assert sorted(containers) == ["logits, greedy", "probs, greedy"]
    for name, lams in (("logits, greedy", [0.5, 1.0]), ("probs, greedy", [1.0])):
        mine = [r for r in rows if r["lam"] > 0 and f"{r['space']}, greedy" == name]
        line = containers[name].lines[0]
        assert [round(float(y), 9) for y in line.get_ydata()] == [
            round(100 * (r["accuracy"] - pilot["accuracy"]), 9) for r in mine]
        assert len(line.get_xdata()) == len(lams)
        assert all(abs(x - lam) < 0.05 for x, lam in zip(line.get_xdata(), lams))  # side by side, near their λ
        for (_, low, high), row in zip(error_bars(containers[name]), mine):
            assert (low, high) == pytest.approx((100 * row["interval"][0], 100 * row["interval"][1]), abs=1e-9)
    bottom, top = axis.get_ylim()
    assert bottom <= -5 and top >= 5  # at least ±5 points, whatever the data
    assert all(bottom <= low and high <= top for c in containers.values() for _, low, high in error_bars(c))
    assert "at least ±5 points" in rendered.figure.texts[0].get_text()


def test_accuracy_plot_fills_only_significant_points_and_keeps_beams_apart(tmp_path):
    from hf_copilot.recipes import plots

    def row(lam, space, beams, correct, fixed, broken):
        return dict(lam=lam, space=space, num_beams=beams, correct=correct, total=300, fixed=fixed, broken=broken,
                    accuracy=correct / 300)

    rows = [row(0.0, "probs", 1, 100, 0, 0), row(1.0, "logits", 1, 118, 20, 2), row(0.5, "logits", 1, 101, 1, 0),
            row(0.0, "probs", 2, 90, 0, 0), row(1.0, "logits", 2, 89, 3, 4)]
    rendered = plots.plot_accuracy_vs_lambda(rows, tmp_path / "accuracy.png")
    axis = rendered.figure.axes[0]
    in_containers = {id(line) for c in axis.containers for line in (c.lines[0], *c.lines[1])}
    hollow = [c.lines[0] for c in axis.containers]
    assert all(line.get_markerfacecolor() == "white" for line in hollow)
    filled = [line for line in axis.lines if id(line) not in in_containers and line.get_marker() == "o"]
    assert [(list(line.get_xdata()), list(line.get_ydata())) for line in filled] == [
        ([pytest.approx(1.0, abs=0.05)], [pytest.approx(6.0)])]  # +20/−2 on 300 items: p < 0.001
    assert rendered.facts["series"]["logits, beam 2"][0][:2] == (1.0, pytest.approx(-1 / 3))
    assert rendered.facts["reference"] == {1: pytest.approx(100 / 3), 2: 30.0}
    assert "greedy 33.3% (100/300), beam 2 30.0% (90/300)" in axis.get_legend().get_texts()[0].get_text()
    assert axis.child_axes == []  # two Pilots: no single absolute-accuracy axis to add
    one_pilot = plots.plot_accuracy_vs_lambda(rows[:3], tmp_path / "greedy.png").figure.axes[0]
    (right,) = one_pilot.child_axes
    assert right.get_ylabel() == "accuracy (%)"


def first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def rectified_tokens(pilot, copilot, tokenizer, example, lam):
    inputs = torch.tensor([word_ids(tokenizer, FMT.prompt(example))])
    with CopilotLogitsProcessor(copilot, pilot, lam=lam, space="logits") as processor:
        output = pilot.generate(input_ids=inputs, max_new_tokens=FMT.max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id, logits_processor=[processor])
    return output[0, inputs.shape[1]:].tolist()


def expected_outcome(pilot_answer, rectified_answer, example):
    """fixed / broken / sideways / unchanged, from the hand-written scoring of both answers."""
    pilot_right, rectified_right = recount(pilot_answer, example), recount(rectified_answer, example)
    if pilot_answer == rectified_answer:
        return "unchanged"
    return {(False, True): "fixed", (True, False): "broken"}.get((pilot_right, rectified_right), "sideways")


def test_rectification_plot_shows_the_step_where_the_decodings_part(tiny_run, tokenizer, tmp_path):
    from hf_copilot.recipes import plots

    pilot, noisy, examples, rows = tiny_run
    best = rows[2]  # logits λ=1 greedy
    with pytest.raises(ValueError, match="space='logits' and num_beams=1"):
        plots.plot_rectification(pilot, noisy, tokenizer, examples, FMT, rows, rows[3], tmp_path / "probs.png")
    rendered = plots.plot_rectification(pilot, noisy, tokenizer, examples, FMT, rows, best, tmp_path / "r.png", top=4)
    assert rendered.path.stat().st_size > 1000

    # Independently: the example the row fixed first (else changed first), both decodings token by token.
    changed = [i for i, (a, b) in enumerate(zip(best["answers"], rows[0]["answers"])) if a != b]
    assert changed
    fixed = [i for i in changed if recount(best["answers"][i], examples[i])]
    index = (fixed or changed)[0]
    pilot_ids = slow_greedy_ids(pilot, tokenizer, examples[index], FMT.max_new_tokens)
    rectified_ids = rectified_tokens(pilot, noisy, tokenizer, examples[index], best["lam"])
    step = first_difference(pilot_ids, rectified_ids)
    assert rendered.facts["example"] == index and rendered.facts["step"] == step
    upper, lower = rendered.figure.axes
    assert upper.get_title() == f"example {index}, step {step}: first step where the rectified and the Pilot's " \
                                f"decodings differ\n{rendered.facts['reference']}"
    assert rendered.facts["pilot_choice"] == tokenizer.decode([pilot_ids[step]])
    assert rendered.facts["rectified_choice"] == tokenizer.decode([rectified_ids[step]])
    assert rendered.facts["outcome"] == expected_outcome(rows[0]["answers"][index], best["answers"][index],
                                                         examples[index])

    pilot_bars, fused_bars = ([bar.get_height() for bar in bars] for bars in upper.containers)
    (correction_bars,) = ([bar.get_height() for bar in bars] for bars in lower.containers)
    prefix = word_ids(tokenizer, FMT.prompt(examples[index])) + pilot_ids[:step]  # shared by both decodings
    with torch.no_grad():
        logits = pilot(input_ids=torch.tensor([prefix])).logits[0, -1].double()
    shown = rendered.facts["token_ids"]
    assert rendered.facts["tokens"] == [tokenizer.decode([t]) for t in shown]
    assert pilot_bars == pytest.approx((100 * torch.softmax(logits, -1)[shown]).tolist(), rel=1e-4)
    for i in range(len(shown)):  # rectified = softmax(Pilot logits + λ × correction): ratios of the shown bars
        expected = (logits[shown[i]] + correction_bars[i]) - (logits[shown[0]] + correction_bars[0])
        assert math.log(fused_bars[i] / fused_bars[0]) == pytest.approx(float(expected), abs=1e-4)
    assert max(pilot_bars) == pilot_bars[rendered.facts["tokens"].index(rendered.facts["pilot_choice"])]
    assert max(fused_bars) == fused_bars[rendered.facts["tokens"].index(rendered.facts["rectified_choice"])]
    ticks = [label.get_text() for label in lower.get_xticklabels()]
    assert sum("(Pilot)" in t for t in ticks) == sum("(rectified)" in t for t in ticks) == 1
    assert [t for t in ticks if "(rectified)" in t] != [t for t in ticks if "(Pilot)" in t]
    assert [text.get_text() for text in lower.texts] == [f"{c:+.3g}" for c in correction_bars]  # values printed
    low, high = lower.get_ylim()  # its own scale: the corrections fill their panel
    assert max(abs(c) for c in correction_bars) > 0.4 * max(-low, high)


@pytest.mark.slow
def test_rectification_plot_marks_the_reference_token_and_what_the_step_did(trained, tokenizer, tmp_path):
    """Each item drawn alone: the reference's token at the drawn step is its own tokenisation's (target, then EOS)
    wherever both decodings wrote the reference's tokens so far, else none; the outcome follows both answers'
    scores."""
    from hf_copilot.recipes import plots

    pilot, copilot = trained
    noisy = noisy_copilot(pilot, copilot, 0.04)  # small enough that some decodings part late, off the reference
    examples = qa_examples(8, start=12) + qa_examples(4)
    rows = evaluate_decodings(pilot, tokenizer, examples, FMT, [Decoding(), Decoding(1.0, "logits")], copilot=noisy)
    best = rows[1]
    seen = set()
    for i, example in enumerate(examples):
        alone = [dict(row, answers=[row["answers"][i]]) for row in (rows[0], best)]
        rendered = plots.plot_rectification(pilot, noisy, tokenizer, [example], FMT, alone, alone[1],
                                            tmp_path / f"{i}.png", top=2)
        facts = rendered.facts
        step = facts["step"]
        written = rectified_tokens(pilot, noisy, tokenizer, example, best["lam"])
        pilot_ids = slow_greedy_ids(pilot, tokenizer, example, FMT.max_new_tokens)
        reference = word_ids(tokenizer, FMT.target(example)) + [tokenizer.eos_token_id]
        expected = reference[step] if written[:step] == reference[:step] else None
        assert facts["reference_token_id"] == expected
        outcome = expected_outcome(rows[0]["answers"][i], best["answers"][i], example)
        assert facts["outcome"] == outcome
        assert (facts["pilot_correct"], facts["rectified_correct"]) == (
            recount(rows[0]["answers"][i], example), recount(best["answers"][i], example))
        marks = ["right" if recount(row["answers"][i], example) else "wrong" for row in (best, rows[0])]
        assert rendered.figure.get_suptitle().splitlines() == [
            plots.OUTCOMES[outcome], f"rectified ({best['decoding']}): {best['answers'][i]!r} ({marks[0]})",
            f"Pilot alone: {rows[0]['answers'][i]!r} ({marks[1]})"]
        upper, lower = rendered.figure.axes
        assert upper.get_title().splitlines()[-1] == facts["reference"]
        ticks = [label.get_text() for label in lower.get_xticklabels()]
        marked = [t for t in ticks if "(reference)" in t]
        if expected is None:
            assert marked == [] and facts["reference_token"] is None
            assert facts["reference"] == "the reference answer's tokens left this path before this step"
        else:
            assert marked == [ticks[facts["token_ids"].index(expected)]]  # shown even when outside the top 2
            assert facts["reference_token"] == tokenizer.decode([expected])
            chosen = (expected == pilot_ids[step], expected == written[step])
            assert {(True, True): "both decodings choose the reference's token", (True, False): "is the Pilot choice",
                    (False, True): "is the rectified choice", (False, False): "neither choice is the reference's"
                    }[chosen] in facts["reference"]
        seen.add((expected is None, outcome))
    assert {on_path for on_path, _ in seen} == {True, False}  # both kinds of step occur among these items
    assert len({outcome for _, outcome in seen}) >= 2


def test_rectification_plot_falls_back_to_the_first_answer_token(trained, tokenizer, tmp_path):
    from hf_copilot.recipes import plots

    pilot, copilot = trained
    silent = noisy_copilot(pilot, copilot, 0)  # corrects nothing: the decodings never part
    examples = qa_examples(4, start=12)
    answers = generate_answers(pilot, tokenizer, examples, FMT)
    assert answers[0].startswith("the correct answer is ")  # the lead is 4 words, the answer the 5th
    rows = [dict(lam=0.0, space="probs", num_beams=1, answers=answers),
            dict(lam=1.0, space="logits", num_beams=1, decoding="logits λ=1 greedy", answers=answers)]
    rendered = plots.plot_rectification(pilot, silent, tokenizer, examples, FMT, rows, rows[1], tmp_path / "r.png")
    assert rendered.facts["example"] == 0 and rendered.facts["step"] == 4
    assert rendered.figure.axes[0].get_title().startswith("example 0, step 4: first answer token")
    assert rendered.facts["pilot_choice"] == rendered.facts["rectified_choice"] == answers[0].split()[4]
    assert set(rendered.facts["correction"]) == {0.0}
    assert rendered.facts["outcome"] == "unchanged"
    assert rendered.facts["reference_token"] == FMT.target(examples[0]).split()[4]  # after the shared lead

    lead = [tokenizer.convert_tokens_to_ids(word) for word in "the correct answer".split()]
    assert plots._deciding_step(tokenizer, "the correct answer is ", lead, lead) == (
        2, "last step; the two decodings agree and no answer was written")  # it stopped inside the lead


def test_first_error_ranks_match_a_per_example_recount(trained, tokenizer):
    pilot, _ = trained
    examples = qa_examples(7)
    ranks = first_error_ranks(pilot, tokenizer, examples, FMT, batch_size=3)
    assert len(ranks) == len(examples)
    for example, rank in zip(examples, ranks):
        row = encode_example(example, tokenizer, FMT, 256)  # one example alone, no padding
        with torch.no_grad():
            logits = pilot(input_ids=torch.tensor([row["input_ids"]])).logits[0]
        expected = None
        for position, label in enumerate(row["labels"][1:]):  # logits at position t predict label t + 1
            if label != -100 and int(logits[position].argmax()) != label:
                expected = int((logits[position] > logits[position, label]).sum())
                break
        assert rank == expected
    assert any(rank is not None for rank in ranks)
