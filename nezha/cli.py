"""The `nezha` command: import-amazon, prepare, train, evaluate, quickstart, experiment, bench, catalog."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nezha.config import ConfigError, add_config_arguments, config_from_args

log = logging.getLogger("nezha")


def _prepare(args: argparse.Namespace) -> None:
    from nezha.prepare import PrepareConfig, prepare

    result = prepare(config_from_args(PrepareConfig, args))
    s = result.summary
    ids = s["semantic_ids"]
    print(f"{'reused' if result.cached else 'prepared'} {result.out_dir}: {s['num_items']} items, "
          f"{s['num_users']} users, codebooks {s['codebook_sizes']}, collision rate "
          f"{ids['raw_collision_rate']:.4f} -> {ids.get('final_collision_rate', 0.0):.4f}, split {s['split_sizes']}, "
          f"{s['timings']['total_s']:.1f} s")


@dataclass
class ImportAmazonConfig:
    """Convert original Amazon Review files (reviews + metadata) into a dataset directory for `nezha prepare`."""

    reviews: str = field(default="", metadata={"help": "reviews file, JSON lines (.json or .json.gz)"})
    meta: str = field(default="", metadata={"help": "metadata file, JSON lines (.json or .json.gz)"})
    out: str = field(default="", metadata={"help": "dataset directory to write (items.jsonl, interactions.csv)"})
    k_core: int = field(default=5, metadata={"help": "keep users and items with at least this many reviews"})


def _import_amazon(args: argparse.Namespace) -> None:
    from nezha.data.datasets import load_amazon_raw, write_dataset

    cfg = config_from_args(ImportAmazonConfig, args)
    missing = [name for name in ("reviews", "meta", "out") if not getattr(cfg, name)]
    if missing:
        raise ConfigError(f"pass {' and '.join('--' + name for name in missing)}")
    ds = load_amazon_raw(cfg.reviews, cfg.meta, k_core=cfg.k_core)
    out = write_dataset(ds, cfg.out)
    print(f"wrote {out}: {ds.num_items} items, {ds.num_users} users, {ds.stats['num_interactions']} interactions "
          f"({ds.stats['unknown_item_interactions']} reviews of items without metadata dropped); "
          f"next: nezha prepare --dataset {out}")


def _train(args: argparse.Namespace) -> None:
    from nezha.training import TrainConfig, train

    result = train(config_from_args(TrainConfig, args))
    print(f"best checkpoint: {result.best_checkpoint} (validation {_metrics_line(result.best_metrics)})")


def _evaluate(args: argparse.Namespace) -> None:
    from nezha.evaluation import EvalConfig, evaluate, format_table

    cfg = config_from_args(EvalConfig, args)
    report = evaluate(cfg)
    print(format_table(report))
    if cfg.json:
        print(f"wrote {cfg.json}")


def _experiment(args: argparse.Namespace) -> None:
    from nezha.experiment import ExperimentConfig, run_experiment

    cfg = config_from_args(ExperimentConfig, args)
    run_experiment(cfg)
    print((Path(cfg.out) / "results.md").read_text())
    print(f"wrote {cfg.out}/summary.json, results.md, curves.png")


def _metrics_line(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith(("hit@", "ndcg@")))


@dataclass
class QuickstartConfig:
    """Prepare Amazon Beauty, train a small CPU model with every head, evaluate all decoders."""

    out: str = "runs/quickstart"
    dataset: str = "amazon-beauty"
    data_dir: str | None = field(default=None, metadata={"help": "dir holding the dataset (or NEZHA_DATA_DIR)"})
    backbone: str = "small"
    transition: str = "gru"
    objectives: list[str] = field(default_factory=lambda: ["nezha", "lm", "mtp"])
    epochs: float = 2.0
    batch_size: int = 128
    lr: float = 2e-3
    beam: int = 20
    eval_users: int = field(default=2000, metadata={"help": "test users scored (0: all)"})
    latency_requests: int = 30


def _quickstart(args: argparse.Namespace) -> None:
    from nezha.evaluation import EvalConfig, evaluate, format_table
    from nezha.prepare import PrepareConfig, prepare
    from nezha.training import TrainConfig, train

    cfg = config_from_args(QuickstartConfig, args)
    out = Path(cfg.out)
    start = time.perf_counter()
    log.info("[1/3] prepare %s", cfg.dataset)
    prepare(PrepareConfig(dataset=cfg.dataset, data_dir=cfg.data_dir, out=str(out / "prepared")))
    log.info("[2/3] train (%s backbone, %s transition, objectives %s)", cfg.backbone, cfg.transition, cfg.objectives)
    result = train(TrainConfig(prepared=str(out / "prepared"), out=str(out / "train"), backbone=cfg.backbone,
                               transition=cfg.transition, objectives=cfg.objectives, epochs=cfg.epochs,
                               batch_size=cfg.batch_size, lr=cfg.lr, eval_beam=cfg.beam))
    log.info("[3/3] evaluate on the test split")
    report = evaluate(EvalConfig(checkpoint=str(result.best_checkpoint), beam=cfg.beam, max_users=cfg.eval_users,
                                 decoders=["nezha", "beam", "hf-beam-constrained", "hf-beam", "mtp", "popular"],
                                 latency_requests=cfg.latency_requests, json=str(out / "eval.json")))
    print(format_table(report))
    print(f"wrote {out / 'eval.json'} in {time.perf_counter() - start:.0f} s")


Command = tuple[str, type | None, Callable[[argparse.Namespace], None]]


def _commands() -> list[Command]:
    from nezha import bench, catalog_cli
    from nezha.evaluation import EvalConfig
    from nezha.experiment import ExperimentConfig
    from nezha.prepare import PrepareConfig
    from nezha.training import TrainConfig

    return [
        ("import-amazon", ImportAmazonConfig, _import_amazon),
        ("prepare", PrepareConfig, _prepare),
        ("train", TrainConfig, _train),
        ("evaluate", EvalConfig, _evaluate),
        ("quickstart", QuickstartConfig, _quickstart),
        ("experiment", ExperimentConfig, _experiment),
        ("bench", None, bench.register),  # these build their own sub-parsers
        ("catalog", None, catalog_cli.register),
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nezha", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cls, handler in _commands():
        if cls is None:  # the subcommand builds its own sub-parser
            handler(sub)
            continue
        p = sub.add_parser(name, help=(cls.__doc__ or "").strip().splitlines()[0], description=cls.__doc__)
        add_config_arguments(p, cls)
        p.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        args.handler(args)
    except (ConfigError, ValueError, FileNotFoundError, KeyError) as exc:
        # Bad input is the user's to fix: say what is wrong, no stack trace (-v shows it).
        if args.verbose:
            raise
        print(f"nezha {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
