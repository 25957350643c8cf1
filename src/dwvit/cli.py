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

    model = dwvit.create_model(args.name, num_labels=args.num_labels, **parse_overrides(args.overrides))
    model.save_pretrained(args.output_dir)
    dwvit.make_image_processor(model.config.image_size, dataset=args.dataset).save_pretrained(args.output_dir)
    print(f"saved {args.name} ({sum(p.numel() for p in model.parameters()):,} parameters) to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
