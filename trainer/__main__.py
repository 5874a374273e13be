"""``python -m trainer`` — one training run with fixed hyperparameters (``make train``).

Examples::

    python -m trainer --data textures --epochs 2 --out runs/textures
    python -m trainer --config configs/graphite.yaml --set optim.lr=2e-4 --set loss.gamma=0.25
    python -m trainer --list-backbones
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from edgetune.errors import EdgetuneError
from edgetune.logs import setup_cli_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="YAML run config (see configs/); other options override it")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. optim.lr=3e-4 (repeatable)",
    )
    p.add_argument("--data", help="built-in dataset (elpv, textures) or an ImageFolder/CSV path")
    p.add_argument("--epochs", type=int)
    p.add_argument("--backbone")
    p.add_argument("--workers", type=int, help="Ray Train DDP workers (1 = in-process)")
    p.add_argument("--img", type=int, help="network input size (default: the backbone's)")
    p.add_argument("--init", help="earlier edgetune run/checkpoint to start the backbone from")
    p.add_argument("--seed", type=int)
    p.add_argument("--repeats", type=int, default=1, help="repeat with n seeds, report mean ± std")
    p.add_argument("--strict", action="store_true", help="fail on corrupt images instead of skipping them")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (AMP, channels_last)")
    p.add_argument("--out", help="run directory (default runs/train/<dataset>-<backbone>)")
    p.add_argument("--list-backbones", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> Any:
    from trainer.config import TrainConfig, parse_override

    cfg = TrainConfig.from_yaml(args.config) if args.config else TrainConfig()
    overrides: dict[str, Any] = {}
    for flag, key in (
        ("data", "data.dataset"),
        ("epochs", "epochs"),
        ("backbone", "model.backbone"),
        ("workers", "workers"),
        ("img", "model.img_size"),
        ("init", "model.init"),
        ("seed", "seed"),
    ):
        v = getattr(args, flag)
        if v is not None:
            overrides[key] = v
    if args.strict:
        overrides["data.strict"] = True
    if args.gpu:
        overrides["use_gpu"] = True
    for s in args.set:
        k, v = parse_override(s)
        overrides[k] = v
    return cfg.replace(overrides) if overrides else cfg


def default_out(cfg: Any) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(cfg.data.dataset).name or "data")
    return Path("runs") / "train" / f"{name}-{cfg.model.backbone}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_cli_logging(verbose=False)
    try:
        if args.list_backbones:
            from trainer.backbones import get_backbone_info, list_backbones
            from trainer.model import backbone_cut_points

            for name in list_backbones():
                info = get_backbone_info(name)
                cuts = backbone_cut_points(name)
                print(
                    f"{name:22s} {info.family:14s} features={info.feature_dim:5d} input={info.default_spec.input_size}"
                    f" freeze cuts={len(cuts) - 1} (" + " ".join(f"{c.fraction:.2f}" for c in cuts[1:]) + ")"
                )
            return 0
        cfg = config_from_args(args)
        out = Path(args.out) if args.out else default_out(cfg)
        from trainer.run import format_summary, run_repeats

        metrics = run_repeats(cfg, out, args.repeats)
    except EdgetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\n{format_summary(metrics)}")
    print(f"wrote {out / 'metrics.json'}, {out / 'confusion_matrix.png'}")
    if "robustness" in metrics:
        print("robustness: " + json.dumps({k: round(v, 4) for k, v in metrics["robustness"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
