"""Choose nezha-rescore's mix (mix * log p_LM + (1 - mix) * log p_draft) on validation, then score test with it.

One scoring pass per split (`score_candidates`) serves every mix (`rank_candidates`), so the sweep costs one
decode. The mix with the best validation NDCG@10 is applied to the test users the grid scored.

    python experiments/rescore_mix.py runs/exp/games-v2 games__joint__s0 --out results/games-v2/rescore_mix_s0.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from nezha.decoding import prompt_for, rank_candidates, score_candidates
from nezha.experiment import ExperimentConfig, prepared_dir
from nezha.metrics import metrics_from_ranks, target_ranks
from nezha.model.checkpoint import load_checkpoint
from nezha.prepared import load_prepared

MIXES = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)


def sweep(model, catalog, verifier, examples, beam: int, mixes=MIXES, batch_size: int = 256) -> dict[float, dict]:
    ranked: dict[float, list[np.ndarray]] = {m: [] for m in mixes}
    for first in range(0, len(examples), batch_size):
        histories = [catalog.codes[h] for h in examples.histories[first : first + batch_size]]
        input_ids, mask = prompt_for(model, "nezha-rescore", histories, "cpu")
        scored = score_candidates(model, input_ids, mask, verifier, beam, beam)
        for m in mixes:
            ranked[m].append(rank_candidates(scored, verifier, "prefix", beam, m).ids.numpy())
    targets = catalog.packed[examples.targets]
    return {m: metrics_from_ranks(target_ranks(np.concatenate(r), targets)) for m, r in ranked.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", type=Path)
    parser.add_argument("run")
    parser.add_argument("--valid-users", type=int, default=5000)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = ExperimentConfig(**json.loads((args.experiment / "experiment.json").read_text()))
    result = json.loads((args.experiment / "runs" / args.run / "result.json").read_text())
    catalog, split, _ = load_prepared(prepared_dir(cfg, result["dataset"]))
    model = load_checkpoint(args.experiment / "runs" / args.run / "train" / "best").eval()
    verifier = catalog.verifier()
    valid = sweep(model, catalog, verifier, split.valid.subset(args.valid_users), cfg.beam)
    best = max(valid, key=lambda m: valid[m]["ndcg@10"])
    test = sweep(model, catalog, verifier, split.test.subset(cfg.eval_users), cfg.beam, mixes=(best, 1.0))
    report = {"run": args.run, "valid_users": min(args.valid_users, len(split.valid)),
              "valid": {str(m): v for m, v in valid.items()}, "chosen_mix": best,
              "test": {str(m): v for m, v in test.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({"chosen_mix": best, "valid_ndcg@10": {m: round(v["ndcg@10"], 4) for m, v in valid.items()},
                      "test": {m: (round(v["hit@10"], 4), round(v["ndcg@10"], 4)) for m, v in test.items()}}))


if __name__ == "__main__":
    with torch.inference_mode():
        main()
