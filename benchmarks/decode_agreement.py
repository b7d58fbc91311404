"""The torch decode path against the CPU path on the same photos (issue 25's agreement figures).

Per size (640x480 and 1600x1200 photo-like JPEGs, ``--n`` each): the largest and the 99.5th
percentile difference of every statistic, the dHash's differing bits, the copy descriptors'
cosine, the model inputs' mean absolute difference, and the share of files whose pixel hashes
are equal; plus the two paths' decode rate here (one process). ``--device cuda`` runs the torch
path on a GPU (the GPU figures); the default is this machine's CPU.

    .venv/bin/python benchmarks/decode_agreement.py --n 300
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import print_table, save_json  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--out", default="benchmarks/results/decode_agreement.json")
    args = parser.parse_args()

    from curation.stages.decode import decode_image
    from curation.stages.decode_torch import TorchDecoder
    from testkit.decode_agreement import compare_paths, photo_jpeg

    rows = []
    for width, height in ((640, 480), (1600, 1200)):
        files = [photo_jpeg(width, height, seed) for seed in range(args.n)]
        diff = compare_paths(files, image_size=args.image_size, device=args.device)
        t = time.perf_counter()
        for data in files:
            decode_image(data, image_size=args.image_size, max_pixels=10**9)
        cpu_rate = len(files) / (time.perf_counter() - t)
        decoder = TorchDecoder(image_size=args.image_size, device=args.device)
        t = time.perf_counter()
        for start in range(0, len(files), 64):
            decoder(files[start:start + 64])
        torch_rate = len(files) / (time.perf_counter() - t)
        row = {"size": f"{width}x{height}", "files": len(files), "cpu_path_img_s": round(cpu_rate, 1),
               f"torch_path_{args.device}_img_s": round(torch_rate, 1)}
        for key in ("brightness", "contrast", "shadows", "highlights", "sharpness_relative", "model_input_mad"):
            row[f"{key}_max"] = round(float(diff[key].max()), 5)
            row[f"{key}_p99.5"] = round(float(np.percentile(diff[key], 99.5)), 5)
        row["phash_bits_max"] = int(diff["phash_bits"].max())
        row["phash_equal_share"] = round(float((diff["phash_bits"] == 0).mean()), 4)
        row["descriptor_cosine_min"] = round(float(diff["descriptor_cosine"].min()), 5)
        row["descriptor_cosine_ge_0.99_share"] = round(float((diff["descriptor_cosine"] >= 0.99).mean()), 4)
        row["pixel_hash_equal_share"] = round(float(diff["pixel_hash_equal"].mean()), 4)
        rows.append(row)
    print_table(rows, ["size", "files", "cpu_path_img_s", f"torch_path_{args.device}_img_s", "brightness_max",
                       "contrast_max", "shadows_max", "highlights_max", "sharpness_relative_max",
                       "sharpness_relative_p99.5", "phash_bits_max", "phash_equal_share", "descriptor_cosine_min",
                       "model_input_mad_max", "pixel_hash_equal_share"])
    save_json(args.out, {"device": args.device, "machine": f"{os.cpu_count()} CPUs", "rows": rows})


if __name__ == "__main__":
    main()
