"""Are the Pilot's test-time mistakes visible in what the Copilot reads? A linear probe, before any Copilot.

    python -m benchmarks.quality.error_visibility --cell runs/quality/cpu/arc_easy/seed1   # a finished quality.py cell

At the position where the Pilot chooses its answer (the first token after "the correct answer is"), teacher-forced,
a logistic regression on the Pilot's layer-averaged hidden state h̄ (what the Copilot cross-attends to) learns,
on the training items, whether the Pilot's top token there is wrong; it is then scored on the test items by AUROC,
beside the Pilot's own uncertainty (1 − its top probability) as a predictor. If h̄ does not predict the mistakes
on unseen items better than the Pilot's confidence does, a Copilot reading h̄ has nothing to gate or correct with.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hf_copilot.recipes.diagnostics import teacher_forced_records
from hf_copilot.recipes.finetune import load_pilot
from hf_copilot.errors import IGNORE_INDEX
from hf_copilot.recipes.tasks import TASKS

from benchmarks.quality.protocols import protocol_data


def decision_points(pilot, tokenizer, examples, task_format, lead: str = "the correct answer is"):
    """Per example: h̄, the Pilot's top probability and whether its top token is wrong, at the answer's choice."""
    skip = len(tokenizer(lead, add_special_tokens=False)["input_ids"]) if examples[0].choices else 0  # numbers: none
    features, confidence, wrong = [], [], []
    for record in teacher_forced_records(pilot, tokenizer, examples, task_format):
        labels = record.next_token_labels()
        for row in range(labels.shape[0]):
            answer = (labels[row] != IGNORE_INDEX).nonzero().flatten()
            position = int(answer[min(skip, len(answer) - 1)])
            probs = torch.softmax(record.logits[row, position].float(), dim=-1)
            features.append(record.hidden_states[row, position].float())
            confidence.append(float(probs.max()))
            wrong.append(int(probs.argmax()) != int(labels[row, position]))
    return torch.stack(features), torch.tensor(confidence), torch.tensor(wrong, dtype=torch.float)


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    pos, neg = scores[positive.bool()], scores[~positive.bool()]
    greater = (pos[:, None] > neg[None, :]).float() + 0.5 * (pos[:, None] == neg[None, :]).float()
    return float(greater.mean())


def fit_probe(features: torch.Tensor, targets: torch.Tensor, l2: float):
    """L2-regularised logistic regression on standardised features (full-batch L-BFGS)."""
    mean, std = features.mean(0), features.std(0) + 1e-6
    x = (features - mean) / std
    weight = torch.zeros(x.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ weight + bias, targets) + l2 * weight.square().sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return lambda f: ((f - mean) / std @ weight + bias).detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", type=Path, required=True, help="a finished quality.py cell folder")
    parser.add_argument("--l2", type=lambda t: [float(v) for v in t.split(",")], default=[1e-3, 1e-2, 1e-1])
    args = parser.parse_args()
    result = json.loads((args.cell / "result.json").read_text())
    task = result["task"]
    task_format = TASKS[task].format
    train, test = protocol_data(task, result["protocol"])  # the cell's own data
    pilot, tokenizer = load_pilot(args.cell / "joint" / "pilot")
    train_h, train_conf, train_wrong = decision_points(pilot, tokenizer, train, task_format)
    test_h, test_conf, test_wrong = decision_points(pilot, tokenizer, test, task_format)
    report = {"task": task, "seed": result["seed"], "train_items": len(train), "test_items": len(test),
              "train_wrong": float(train_wrong.mean()), "test_wrong": float(test_wrong.mean()),
              "pilot_uncertainty_auroc": {"train": auroc(-train_conf, train_wrong), "test": auroc(-test_conf, test_wrong)},
              "probe_auroc": {}}
    for l2 in args.l2:
        probe = fit_probe(train_h, train_wrong, l2)
        report["probe_auroc"][f"l2={l2:g}"] = {"train": auroc(probe(train_h), train_wrong),
                                               "test": auroc(probe(test_h), test_wrong)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
