"""Top-1 and top-k accuracy from class scores, as an `evaluate` metric that ships with dwvit.

`evaluate.load("accuracy")` fetches its script from the Hub and fails offline; this module is loaded by path
(`evaluate.load(dwvit.training.metrics.METRIC_PATH)`), so evaluation never needs the network.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Top-1 accuracy is the fraction of examples whose highest-scoring class is the reference class; top-k accuracy
the fraction whose reference class is among the k highest-scoring classes (ties broken by class index).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): class scores (logits or probabilities), one row per example.
    references (`list` of `int`): the reference class of each example.
    top_k (`int`, defaults to 5): the k of the second accuracy reported (capped at the number of classes).
Returns:
    accuracy (`float`): top-1 accuracy in [0, 1].
    top{k}_accuracy (`float`): top-k accuracy in [0, 1].
Examples:
    >>> metric = evaluate.load("path/to/dwvit/training/accuracy")
    >>> metric.compute(predictions=[[0.1, 0.9], [0.8, 0.2]], references=[1, 1], top_k=2)
    {'accuracy': 0.5, 'top2_accuracy': 1.0}
"""

_CITATION = """
@article{zhang2025depthwise,
  title   = {Depth-Wise Convolutions in Vision Transformers for Efficient Training on Small Datasets},
  author  = {Zhang and Xu and Luo and Wang},
  journal = {Neurocomputing},
  volume  = {617},
  pages   = {128998},
  year    = {2025}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, top_k=5):
        scores = np.asarray(predictions, dtype=np.float64)
        references = np.asarray(references, dtype=np.int64)
        if scores.ndim != 2 or scores.shape[0] != references.shape[0]:
            raise ValueError(
                f"predictions must be (examples, classes) scores matching references; got {scores.shape} "
                f"for {references.shape[0]} references."
            )
        if int(top_k) < 1:
            raise ValueError(f"top_k must be >= 1; got {top_k}.")
        # A stable sort of the negated scores ranks equal scores by class index, deterministically.
        ranking = np.argsort(-scores, axis=1, kind="stable")
        k = min(int(top_k), scores.shape[1])
        hits = ranking[:, :k] == references[:, None]
        return {
            "accuracy": float(hits[:, 0].mean()),
            f"top{int(top_k)}_accuracy": float(hits.any(axis=1).mean()),
        }
