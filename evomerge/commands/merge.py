"""`evomerge merge RECIPE.yaml OUT_DIR`: materialize a mergekit-format recipe into a Hugging Face folder."""

from __future__ import annotations

import argparse


def shard_size(text: str) -> int:
    """--shard-size as bytes: '5GB', '500MB', '2GiB' or a number of bytes (argparse reports the error)."""
    from evomerge.merge.materialize import parse_size

    try:
        n = parse_size(text)
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"'{text}' is not a size (e.g. 5GB, 500MB, 2GiB, or bytes)") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"'{text}': a shard size must be positive")
    return n


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge models from a recipe YAML into a Hugging Face folder",
                       description="Materialize a mergekit-format recipe (`evomerge export` writes one) into a "
                                   "Hugging Face folder: sharded safetensors, config, tokenizer, model card.")
    p.add_argument("recipe", help="mergekit-format recipe YAML")
    p.add_argument("out_dir", help="output folder (written atomically)")
    p.add_argument("--device", default="cpu", help="where to compute the merge (cpu, cuda, cuda:1)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="output dtype (default: recipe's)")
    p.add_argument("--shard-size", type=shard_size, default="5GB",
                   help="maximum safetensors shard size, e.g. 2GB, 500MB, 2GiB (default 5GB)")
    p.add_argument("--no-tokenizer", action="store_true", help="do not copy the tokenizer")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--trust-remote-code", action="store_true", help="allow models with custom code")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run, input_arg="recipe")


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from evomerge.merge.materialize import materialize
    from evomerge.recipe import Recipe
    from evomerge.yamlio import read_text, validation_error

    recipe = Recipe.from_yaml(read_text(args.recipe, what="recipe"), source=args.recipe).expand_refs()
    try:
        out = materialize(
            recipe, args.out_dir, device=args.device, dtype=args.dtype, shard_size=args.shard_size,
            copy_tokenizer=not args.no_tokenizer, overwrite=args.overwrite, progress=not args.quiet,
            recipe_source=args.recipe, trust_remote_code=args.trust_remote_code,
        )
    except ValidationError as exc:  # planning builds slices: `models:` of different layer counts land here
        raise validation_error(exc, args.recipe, key="models" if recipe.models else "slices") from None
    print(f"wrote {out}")
    return 0
