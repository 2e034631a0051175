"""A small copy of labelled photo folders for a machine the photos cannot be read from (a lent GPU host).

Every image is resized so its longest side is at most ``--max-side`` pixels and re-encoded as JPEG at
``--quality``; ``labels.csv`` (and any other CSV beside it) is copied unchanged, so the copy reads with the same
layout, grades and patient splits. The copy is for local transfer only: the photos' licences forbid putting
them in the repository, so write it to a git-ignored folder.

    python -m benchmarks.pack_photos ../shared/data/eyepacs_full ../shared/data/messidor2 --out .pack/photos
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import cv2


def pack_folder(source: Path, dest: Path, max_side: int, quality: int) -> int:
    """Resize-and-recompress every image of ``source/images``; returns the bytes written."""
    (dest / "images").mkdir(parents=True, exist_ok=True)
    for csv in source.glob("*.csv"):
        shutil.copy2(csv, dest / csv.name)
    written = 0
    for image_path in sorted((source / "images").iterdir()):
        image = cv2.imread(str(image_path), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"{image_path} is not a readable image; remove it from the folder or its labels.csv")
        scale = max_side / max(image.shape[:2])
        if scale < 1:
            image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        # The same file name keeps labels.csv valid; a .png source is still JPEG-encoded (cv2 reads by content).
        target = dest / "images" / image_path.name
        ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise ValueError(f"could not encode {image_path}")
        target.write_bytes(encoded.tobytes())
        written += len(encoded)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="dataset folders with images/ and labels.csv")
    parser.add_argument("--out", type=Path, required=True, help="git-ignored destination; one sub-folder per source")
    parser.add_argument("--max-side", type=int, default=400)
    parser.add_argument("--quality", type=int, default=70)
    args = parser.parse_args(argv)
    for folder in args.folders:
        size = pack_folder(folder, args.out / folder.name, args.max_side, args.quality)
        print(f"{folder} -> {args.out / folder.name}: {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
