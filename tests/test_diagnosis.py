import numpy as np
import torch

from nezha.catalog import Catalog
from nezha.data.split import Examples
from nezha.diagnosis import first_code_seen, hits_by_first_code_seen, level_scores
from nezha.model.checkpoint import create_model
from nezha.model.model import ModelConfig
from nezha.training import make_batch

SIZES = [5, 4, 3]


def tiny_catalog() -> Catalog:
    codes = np.array([[0, 0, 0], [0, 1, 2], [1, 3, 1], [2, 2, 0], [4, 0, 1], [3, 1, 1]])
    return Catalog([f"i{i}" for i in range(len(codes))], codes, SIZES, [""] * len(codes))


def test_level_scores_match_the_training_losses():
    torch.manual_seed(0)
    catalog = tiny_catalog()
    model = create_model(ModelConfig(backbone="tiny", codebook_sizes=SIZES, objectives=["joint", "mtp"])).eval()
    examples = Examples([np.array([0, 2]), np.array([1]), np.array([3, 4, 5])], np.array([1, 5, 0]))
    scores = level_scores(model, catalog, examples, batch_size=2)  # two batches: sums must be per example
    assert set(scores) == {"nezha", "mtp", "lm"}
    with torch.inference_mode():
        losses = model.losses(make_batch(model, catalog, list(examples.histories), examples.targets, "cpu"))
    for head in ("nezha", "mtp"):  # the training loss is the mean over levels of the mean CE
        assert np.isclose(np.mean([s["ce"] for s in scores[head]]), losses[head].item(), rtol=1e-5)
    # The LM's CE restricted to a level's codes cannot exceed its CE over the whole vocabulary.
    assert np.mean([s["ce"] for s in scores["lm"]]) <= losses["lm"].item() + 1e-6
    for head in scores.values():
        assert [s["level"] for s in head] == [0, 1, 2]
        assert all(0.0 <= s["accuracy"] <= 1.0 for s in head)


def test_hits_split_by_whether_the_first_code_was_seen():
    catalog = tiny_catalog()
    # user 0's target (item 1, first code 0) shares item 0's first code; user 1's (item 2, code 1) does not
    examples = Examples([np.array([0, 3]), np.array([0, 4]), np.array([2])], np.array([1, 2, 2]))
    seen = first_code_seen(catalog, examples)
    assert seen.tolist() == [True, False, True]
    split = hits_by_first_code_seen(np.array([0, 3, 12]), seen, k=10)
    assert split == {"seen": {"users": 2, "hit@10": 0.5}, "new": {"users": 1, "hit@10": 1.0}}
