"""How close the device pipeline's crop (``mixmask.data.gpu_ops.resized_crop``) comes to
PIL's (the CPU pipeline's, through torchvision), bilinear and bicubic, on real images.

    python benchmarks/crop_fidelity.py --data ../shared/data/cifar10_jpeg_q75.tar.gz

For a few boxes of a 32 px image (upscaled, downscaled, the whole image), the absolute
difference in uint8 steps between ours (float, before any rounding) and PIL's uint8 crop:
mean, 99th percentile and max over every pixel of ``--images`` test images. Prints a table
and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from mixmask.data.datasets import load_image_set
from mixmask.data.gpu_ops import resized_crop

# (top, left, height, width) in a 32 x 32 image, and the output size.
CASES = [((3, 5, 20, 17), 32), ((5, 2, 9, 11), 32), ((0, 0, 32, 32), 24), ((0, 0, 32, 32), 32)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/cifar10_jpeg_q75.tar.gz",
                        help="an ImageFolder tree or tarball of 32 px images")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/crop_fidelity.json"))
    args = parser.parse_args()
    image_set = load_image_set("imagefolder", args.data, "test", subset=args.images)
    pil_images = [image_set.load_item(index)[0] for index in range(len(image_set))]
    images = torch.stack([TF.pil_to_tensor(image) for image in pil_images])
    rows = []
    for box, size in CASES:
        boxes = torch.tensor([box] * len(images))
        for mode in ("bilinear", "bicubic"):
            ours = resized_crop(images, boxes, size, antialias=True, interpolation=mode) * 255
            pil = torch.stack([TF.pil_to_tensor(TF.resized_crop(
                image, *box, [size, size], InterpolationMode[mode.upper()], antialias=True))
                for image in pil_images]).float()
            difference = (ours - pil).abs().flatten()
            rows.append({"box": list(box), "size": size, "interpolation": mode,
                         "mean": float(difference.mean()),
                         "p99": float(torch.quantile(difference, 0.99)),
                         "max": float(difference.max())})
    print(f"{len(images)} images of {args.data}; |ours - PIL| in uint8 steps")
    print("| box (t, l, h, w) | out | resampling | mean | 99th pct | max |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {tuple(row['box'])} | {row['size']} | {row['interpolation']} | "
              f"{row['mean']:.2f} | {row['p99']:.2f} | {row['max']:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "crop_fidelity", "data": args.data,
                                    "images": len(images), "machine": platform.platform(),
                                    "torch": torch.__version__, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
