"""``python -m trainer`` — one training run with fixed hyperparameters (``make train``).

Examples::

    python -m trainer --data textures --epochs 2 --out runs/textures
    python -m trainer --config configs/graphite.yaml --set optim.lr=2e-4 --set loss.gamma=0.25
    python -m trainer --list-backbones
    python -m trainer --data textures --epochs 2 --print-config > run.yaml   # the effective run, every key
    python -m trainer --config run.yaml                                       # reproduces it (flags override)

A run file is a TrainConfig YAML (configs/*.yaml are ones), with ``out`` the run directory, plus an optional
``run:`` section for how the run is done (``repeats``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from edgetune.dataclass_cli import Flag, HelpFormatter, add_fields, add_version, field_values, file_values, opt
from edgetune.errors import ConfigError, EdgetuneError
from edgetune.logs import setup_cli_logging
from trainer.config import TrainConfig, load_yaml_mapping, parse_override


def _config_key(key: str, help: str = "", default: Any = None) -> Any:  # noqa: A002 - argparse's name for it
    """An option that, when given (not None, not False), sets config key ``key`` of the run's TrainConfig."""
    text = f"{help}; sets config {key}" if help else f"sets config {key}"
    return dataclasses.field(default=default, metadata={"help": text, "config_key": key})


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """``python -m trainer``'s options: the run config (YAML, then the options that set one of its keys, then the
    ``--set`` overrides) and how the run is done. The CLI is derived from these fields (edgetune.dataclass_cli)."""

    config: str | None = opt(
        None, "YAML run config (see configs/, or what --print-config prints); other options override it"
    )
    sets: tuple[str, ...] = opt((), "override any config key, e.g. optim.lr=3e-4 (repeatable)")
    data: str | None = _config_key("data.dataset", "built-in dataset (elpv, textures) or an ImageFolder/CSV path")
    epochs: int | None = _config_key("epochs")
    backbone: str | None = _config_key("model.backbone")
    workers: int | None = _config_key("workers", "Ray Train DDP workers (1 = in-process)")
    img: int | None = _config_key("model.img_size", "network input size (default: the backbone's)")
    init: str | None = _config_key("model.init", "earlier edgetune run/checkpoint to start the backbone from")
    seed: int | None = _config_key("seed")
    repeats: int = opt(1, "repeat with n seeds, report mean ± std")
    strict: bool = _config_key("data.strict", "fail on corrupt images instead of skipping them", default=False)
    gpu: bool = _config_key("use_gpu", "one GPU per worker (AMP, channels_last)", default=False)
    out: str | None = opt(None, "run directory (default runs/train/<dataset>-<backbone>)")
    list_backbones: bool = opt(False, "list the backbones (family, feature size, input size, freeze cuts) and exit")
    print_config: bool = opt(
        False,
        "print the effective run config as YAML (the TrainConfig with out resolved, "
        "and run: repeats) and exit; --config reads it back",
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "sets", tuple(self.sets))

    def overrides(self) -> dict[str, Any]:
        """The config keys the options set: the key options given, then the ``--set`` ones (ConfigError if bad)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if "config_key" in f.metadata and v is not None and v is not False:
                out[f.metadata["config_key"]] = v
        for s in self.sets:
            k, v = parse_override(s)
            out[k] = v
        return out

    def train_config(self) -> Any:
        """The run's TrainConfig: the YAML (or the defaults) with :meth:`overrides` applied."""
        cfg = TrainConfig.from_dict(read_run_file(self.config)[0]) if self.config else TrainConfig()
        overrides = self.overrides()
        return cfg.replace(overrides) if overrides else cfg

    def run_dir(self, cfg: TrainConfig) -> Path:
        """Where the run writes: --out, else the config's ``out``, else runs/train/<dataset>-<backbone>."""
        return Path(self.out or cfg.out or default_out(cfg))

    def run_yaml(self) -> str:
        """The effective run as a run file: what --print-config prints and --config reads back."""
        cfg = self.train_config()
        data = cfg.replace({"out": str(self.run_dir(cfg))}).to_dict()
        return str(yaml.safe_dump({**data, RUN_SECTION: {"repeats": self.repeats}}, sort_keys=False))


#: The section of a run file that is not TrainConfig: how the run is done.
RUN_SECTION = "run"
RUN_SECTION_KEYS = ("repeats",)


def read_run_file(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the TrainConfig mapping, the ``run:`` section's TrainOptions values) of a run file (ConfigError: unreadable,
    not a mapping, a ``run:`` key other than :data:`RUN_SECTION_KEYS`, a value of the wrong type)."""
    data = load_yaml_mapping(path, "config")
    run = data.pop(RUN_SECTION, None) or {}
    if not isinstance(run, dict) or set(run) - set(RUN_SECTION_KEYS):
        raise ConfigError(
            f"config {path}: the {RUN_SECTION}: section may set only {', '.join(RUN_SECTION_KEYS)}, got {run!r}"
        )
    try:
        return data, file_values(TrainOptions, run, f"config {path} {RUN_SECTION}:")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer", description=__doc__, formatter_class=HelpFormatter)
    add_fields(p, TrainOptions, {"sets": Flag("--set", repeat=True, metavar="KEY=VALUE")})
    add_version(p)
    return p


def train_options(args: argparse.Namespace) -> TrainOptions:
    """The options from parsed ``python -m trainer`` arguments."""
    return TrainOptions(**field_values(args, TrainOptions))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """``python -m trainer``'s arguments; a ``--config`` file's ``run:`` section gives the defaults of the options
    it sets (flags given override them). ConfigError where the file is bad."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        parser.set_defaults(**read_run_file(args.config)[1])
        args = parser.parse_args(argv)
    return args


def config_from_args(args: argparse.Namespace) -> Any:
    """The run's TrainConfig from parsed ``python -m trainer`` arguments (ConfigError where they are invalid)."""
    return train_options(args).train_config()


def default_out(cfg: Any) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(cfg.data.dataset).name or "data")
    return Path("runs") / "train" / f"{name}-{cfg.model.backbone}"


def main(argv: list[str] | None = None) -> int:
    setup_cli_logging(verbose=False)
    try:
        opts = train_options(parse_args(argv))
        if opts.print_config:
            sys.stdout.write(opts.run_yaml())
            return 0
        if opts.list_backbones:
            from trainer.backbones import get_backbone_info, list_backbones  # noqa: PLC0415 - lazy: efficientnet_lite_pytorch, torch, torchvision
            from trainer.model import backbone_cut_points  # noqa: PLC0415 - lazy: efficientnet_lite_pytorch, torch, torchvision

            for name in list_backbones():
                info = get_backbone_info(name)
                cuts = backbone_cut_points(name)
                print(
                    f"{name:22s} {info.family:14s} features={info.feature_dim:5d} input={info.default_spec.input_size}"
                    f" freeze cuts={len(cuts) - 1} (" + " ".join(f"{c.fraction:.2f}" for c in cuts[1:]) + ")"
                )
            return 0
        cfg = opts.train_config()
        out = opts.run_dir(cfg)
        from trainer.run import format_summary, run_repeats  # noqa: PLC0415 - lazy: efficientnet_lite_pytorch, torch, torchvision

        metrics = run_repeats(cfg, out, opts.repeats)
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
