"""Write configs/cifar100/{base}_{masking}_r18.yaml: every Siamese base x every masking.

Each file composes two others, the base's recipe and a masking fragment, so a recipe is
edited in one place:

    base: [byol_r18.yaml, ../masking/mixmask.yaml]

Run `python configs/make_matrix.py` after adding a base or a masking strategy;
tests/test_config.py checks that the files on disk match.
"""

from __future__ import annotations

from pathlib import Path

BASES = ("mocov2", "byol", "simsiam", "barlow_twins", "vicreg")
MASKINGS = ("none", "erase", "mixmask", "unmix", "both")
DATASET = "cifar100"
HERE = Path(__file__).resolve().parent


def matrix() -> dict[Path, str]:
    files = {}
    for base in BASES:
        for masking in MASKINGS:
            name = f"{base}_{masking}_r18"
            files[HERE / DATASET / f"{name}.yaml"] = (
                f"# {base} x {masking} on {DATASET} (written by configs/make_matrix.py)\n"
                f"base: [{base}_r18.yaml, ../masking/{masking}.yaml]\n"
                f"out_dir: runs/{DATASET}/{name}\n"
            )
    return files


if __name__ == "__main__":
    for path, text in matrix().items():
        path.write_text(text)
    print(f"wrote {len(matrix())} configs under {HERE / DATASET}")
