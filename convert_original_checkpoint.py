#!/usr/bin/env python
"""Convert a checkpoint of the paper's original training code into a `save_pretrained` folder.

    python convert_original_checkpoint.py ckpt_epoch_299.pth converted/ --labels labels.txt

The checkpoint is read without running any code from it (`torch.load(weights_only=True)`, the yacs config read
as plain data); one that tries to run code is refused. Sizes come from the checkpoint's config (MODEL.TYPE,
MODEL.ViT / ViT_S / CaiT_XXS / SWIN, DATA.IMG_SIZE, MODEL.NUM_CLASSES); flags override them and are needed when
the config is absent. The folder holds the model (safetensors, config with auto_map, code files for
`trust_remote_code=True`), an image processor and, when given, label names.
"""

from __future__ import annotations

import argparse
import sys


def _int_or_list(text: str):
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected an int or a comma separated list of ints; got {text!r}")
    return values[0] if len(values) == 1 and "," not in text else values


def _floats(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three comma separated numbers; got {text!r}") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma separated numbers (one per channel); got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    from dwvit.conversion.original_checkpoint import ORIGINAL_MODEL_TYPES
    from dwvit.models.image_processing import DATASET_STATISTICS

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", help="the .pth file the original training code saved")
    parser.add_argument("output_dir", help="folder to create (built beside it and renamed into place)")
    parser.add_argument("--overwrite", action="store_true", help="replace output_dir if it exists")

    sizes = parser.add_argument_group("sizes (override the checkpoint's config; needed when it has none)")
    sizes.add_argument("--model_type", choices=ORIGINAL_MODEL_TYPES, help="MODEL.TYPE")
    sizes.add_argument("--image_size", type=int, help="DATA.IMG_SIZE")
    sizes.add_argument("--num_labels", type=int, help="MODEL.NUM_CLASSES")
    sizes.add_argument("--patch_size", type=int, help="PATCH_SIZE")
    sizes.add_argument("--dim", type=int, help="DIM (ViT, CaiT) or EMBED_DIM (Swin)")
    sizes.add_argument(
        "--depth", type=_int_or_list, help="DEPTHS: an int (ViT, CaiT) or a list such as 2,2,6,2 (Swin)"
    )
    sizes.add_argument(
        "--heads", type=_int_or_list, help="NUM_HEADS: an int (ViT, CaiT) or a list such as 3,6,12,24 (Swin)"
    )
    sizes.add_argument("--mlp_dim", type=int, help="MLP_DIM (ViT, CaiT)")
    sizes.add_argument("--cls_depth", type=int, help="CLS_DEPTHS (CaiT)")
    sizes.add_argument("--window_size", type=int, help="WINDOW_SIZE (Swin)")

    extras = parser.add_argument_group("saved beside the model")
    extras.add_argument(
        "--labels", help="label names: a file with one name per line, or a comma separated list, in class order"
    )
    extras.add_argument(
        "--dataset",
        choices=sorted(DATASET_STATISTICS),
        help="normalisation statistics for the image processor (default: from the config's DATA.DATASET)",
    )
    extras.add_argument("--image_mean", type=_floats, help="per-channel mean, e.g. 0.485,0.456,0.406")
    extras.add_argument("--image_std", type=_floats, help="per-channel std, e.g. 0.229,0.224,0.225")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers import AutoConfig

    from dwvit.conversion.original_checkpoint import convert_original_checkpoint

    try:
        output_dir = convert_original_checkpoint(
            args.checkpoint,
            args.output_dir,
            model_type=args.model_type,
            image_size=args.image_size,
            num_labels=args.num_labels,
            patch_size=args.patch_size,
            dim=args.dim,
            depth=args.depth,
            heads=args.heads,
            mlp_dim=args.mlp_dim,
            cls_depth=args.cls_depth,
            window_size=args.window_size,
            labels=args.labels,
            dataset=args.dataset,
            image_mean=args.image_mean,
            image_std=args.image_std,
            overwrite=args.overwrite,
        )
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    config = AutoConfig.from_pretrained(output_dir)
    print(f"Wrote {config.architectures[0]} ({config.model_type}, {config.num_labels} classes) to {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
