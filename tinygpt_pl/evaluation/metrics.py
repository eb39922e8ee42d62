"""A task's metrics from sums over its examples: one float64 tensor of counts, which ranks add up with one all-reduce
(each rank scores its share of the examples), so that the figures do not depend on the number of devices.

Multiple choice: acc (the continuation of highest log-likelihood is the right one), acc_norm (log-likelihood divided by
the answer's length in characters, lm-eval's), acc_token_mean (highest mean log-likelihood per token, i.e. lowest mean
loss: build-nanogpt's and llm.c's hellaswag.py, on their rendering where the example has one, HellaSwag's). Last word
(lambada): acc (the word is the greedy continuation) and perplexity exp(-mean log-likelihood). Standard errors as
lm-eval reports them for means: the sample standard deviation over sqrt(n); for perplexity, which lm-eval bootstraps,
the delta method's perplexity * stderr(mean log-likelihood).
"""

import math
from collections.abc import Sequence

import torch

from tinygpt_pl.evaluation.scoring import Score
from tinygpt_pl.evaluation.tasks import Example

COUNTS = ("examples", "acc", "acc_norm", "acc_token_mean", "loglikelihood", "loglikelihood_sq", "cropped", "skipped")
METRICS = {"multiple_choice": ("acc", "acc_norm", "acc_token_mean"), "last_word": ("acc", "perplexity")}


def best(values: Sequence[float]) -> int:
    """The index of the highest value, the first of equals (numpy's argmax, as lm-eval uses)."""
    return max(range(len(values)), key=values.__getitem__)


class TaskCounts:
    def __init__(self, kind: str, counts: torch.Tensor | None = None) -> None:
        self.kind = kind
        self.counts = torch.zeros(len(COUNTS), dtype=torch.float64) if counts is None else counts

    def __getitem__(self, name: str) -> float:
        return float(self.counts[COUNTS.index(name)])

    def add(self, **values: float) -> None:
        for name, value in values.items():
            self.counts[COUNTS.index(name)] += value

    def add_example(self, example: Example, scores: list[Score] | None, cropped: bool = False) -> None:
        """One example's scores (None: skipped, its text unencodable): its choices', then, where the example has a
        completion rendering, that rendering's."""
        if scores is None:
            self.add(skipped=1)
            return
        self.add(examples=1, cropped=cropped)
        if self.kind == "last_word":
            ll = scores[0].loglikelihood
            self.add(acc=scores[0].greedy, loglikelihood=ll, loglikelihood_sq=ll**2)
            return
        n = len(example.continuations)
        lls, completion = [s.loglikelihood for s in scores[:n]], scores[n:] or scores
        gold = example.gold
        self.add(acc=best(lls) == gold,
                 acc_norm=best([ll / len(choice) for ll, choice in zip(lls, example.choices, strict=True)]) == gold,
                 acc_token_mean=best([s.loglikelihood / s.tokens for s in completion]) == gold)  # fmt: skip

    def results(self) -> dict[str, dict[str, float]]:
        """Each metric's value and stderr."""
        n = self["examples"]
        out = {}
        for metric in METRICS[self.kind]:
            if metric == "perplexity":
                mean = self["loglikelihood"] / n if n else math.nan
                stderr = mean_stderr(self["loglikelihood"], self["loglikelihood_sq"], n)
                out[metric] = {"value": math.exp(-mean), "stderr": math.exp(-mean) * stderr}
            else:  # a mean of 0s and 1s: its squares sum to its sum
                out[metric] = {"value": self[metric] / n if n else math.nan,
                               "stderr": mean_stderr(self[metric], self[metric], n)}  # fmt: skip
        return out


def mean_stderr(total: float, total_sq: float, n: float) -> float:
    """lm-eval's mean_stderr (sample standard deviation / sqrt(n)) from the sum and the sum of squares."""
    if n < 2:
        return math.nan
    variance = max(total_sq - total * total / n, 0.0) / (n - 1)
    return math.sqrt(variance / n)
