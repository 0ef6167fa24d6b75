"""Encode a dataset split into token shards for the AR stage (in-process; one device).

    python jobs/extract_tokens.py --tokenizer runs/tiny/tokenizer_step300.pt --data-root data/synthetic \\
        --out data/tokens-tiny --views llamagen
    python jobs/extract_tokens.py --tokenizer ideal.pt --data-root /datasets/imagenet --out /data/tokens \\
        --views release --device cuda --batch-size 256 --num-workers 16 --precision bf16

Views: ``llamagen`` = ten-crop at 1.1x and at 1.05x (20 views per image, the paper), ``release`` = center crop +
its horizontal flip (2 views). Output: ``tokens-*.parquet`` + ``manifest.json`` (see ideal_ray/data/tokens.py).
A rerun with the same arguments resumes: finished shards are kept, the rest redone. Prints a JSON summary.
"""
import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="tokenizer checkpoint (save_inference_checkpoint)")
    parser.add_argument("--data-root", required=True, help="ImageNet-layout root (split/<wnid>/<images>)")
    parser.add_argument("--out", required=True, help="output folder for the shards and manifest.json")
    parser.add_argument("--views", default="llamagen", choices=["llamagen", "release"])
    parser.add_argument("--image-size", type=int, default=None, help="crop size (default: the tokenizer's)")
    parser.add_argument("--batch-size", type=int, default=64, help="views per encoder call")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--split", default="train")
    parser.add_argument("--class-index", default="", help="class_index.json (default: <data-root>/class_index.json)")
    parser.add_argument("--shard-images", type=int, default=4096, help="images per Parquet shard")
    parser.add_argument("--row-group-images", type=int, default=4, help="images per Parquet row group")
    parser.add_argument("--num-workers", type=int, default=0, help="decode/crop worker processes")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--no-verify", dest="verify", action="store_false", help="skip the final verification")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    from ideal_ray.data.tokens import TokenShardError
    from ideal_ray.pipelines.extract_local import extract_tokens_local

    try:
        summary = extract_tokens_local(
            args.tokenizer, args.data_root, args.out, views=args.views, image_size=args.image_size,
            batch_size=args.batch_size, device=args.device, split=args.split, class_index=args.class_index,
            shard_images=args.shard_images, row_group_images=args.row_group_images, num_workers=args.num_workers,
            precision=args.precision, verify=args.verify,
        )
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as e:
        if isinstance(e, TokenShardError):
            print(json.dumps(e.summary, indent=1), file=sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
