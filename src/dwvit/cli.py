"""`dwvit` command line: list the named sizes, or create a named model and save it with its image processor.

    dwvit sizes
    dwvit create vit-tiny-cifar ./my-model --num-labels 10 --dataset cifar10 --set use_dw_shortcut=false
"""

from __future__ import annotations

import argparse
import json
import sys


def parse_overrides(assignments: list[str]) -> dict:
    """Turn `field=value` strings into config overrides; values are read as JSON where they parse as JSON."""
    overrides = {}
    for assignment in assignments:
        if "=" not in assignment:
            raise ValueError(f"Config override {assignment!r} must look like field=value (e.g. dw_kernel_sizes=[3,5]).")
        field, raw_value = assignment.split("=", 1)
        try:
            value = json.loads(raw_value)
        except json.JSONDecodeError:
            value = {"true": True, "false": False}.get(raw_value.lower(), raw_value)
        overrides[field.strip()] = value
    return overrides


def main(argv: list[str] | None = None) -> int:
    import dwvit

    parser = argparse.ArgumentParser(prog="dwvit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("sizes", help="list the named sizes with their parameter counts")
    create = commands.add_parser("create", help="create a named model and save it with save_pretrained")
    create.add_argument("name", choices=sorted(dwvit.NAMED_SIZES))
    create.add_argument("output_dir")
    create.add_argument("--num-labels", type=int, default=10)
    create.add_argument("--dataset", default="imagenet", help="normalisation statistics: cifar10, cifar100, imagenet")
    create.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    create.add_argument("--overwrite", action="store_true", help="replace output_dir if it already holds files")
    args = parser.parse_args(argv)

    if args.command == "sizes":
        import torch

        print(f"{'name':<20} {'family':<8} {'image':>5} {'patch':>5} {'params (10 classes)':>20}")
        for name, (config_class, fields) in dwvit.NAMED_SIZES.items():
            with torch.device("meta"):
                model = dwvit.create_model(name, num_labels=10)
            params = sum(p.numel() for p in model.parameters())
            print(f"{name:<20} {config_class.model_type:<8} {fields.get('image_size', ''):>5} "
                  f"{fields.get('patch_size', ''):>5} {params / 1e6:>19.2f}M")
        return 0

    try:
        model = create_folder(args)
    except (FileExistsError, ValueError) as error:
        create.error(str(error))
    print(f"saved {args.name} ({sum(p.numel() for p in model.parameters()):,} parameters) to {args.output_dir}")
    return 0


def create_folder(args):
    """Check everything, build the folder beside `output_dir` and rename it into place: whole or nothing."""
    from pathlib import Path

    import dwvit
    from dwvit.folders import save_folder_whole
    from dwvit.models.image_processing import DATASET_STATISTICS
    from dwvit.models.sizes import check_config_fields

    output_dir = Path(args.output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())) and not args.overwrite:
        raise FileExistsError(f"{output_dir} already holds files; pass --overwrite to replace them.")
    if args.dataset not in DATASET_STATISTICS:
        raise ValueError(f"Unknown --dataset {args.dataset!r}; choose one of: {', '.join(DATASET_STATISTICS)}.")
    overrides = parse_overrides(args.overrides)
    check_config_fields(dwvit.NAMED_SIZES[args.name][0], overrides, where="--set")
    model = dwvit.create_model(args.name, num_labels=args.num_labels, **overrides)
    processor = dwvit.make_image_processor(model.config.image_size, dataset=args.dataset)

    save_folder_whole(output_dir, model, processor, purpose="creating")
    return model


if __name__ == "__main__":
    sys.exit(main())
