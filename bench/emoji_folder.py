"""A folder of real annotated images for `clipsift quickstart`: the emoji-datasource npm packages' 64 px PNGs
(RGBA, transparent backgrounds) with their Unicode names as captions, one sub-folder per emoji category.

    npm pack emoji-datasource-twitter            # 3,786 PNGs and emoji.json (about 60 MB)
    python bench/emoji_folder.py emoji-datasource-twitter-16.0.0.tgz --out emoji
    clipsift quickstart emoji --out qs

Captions: the emoji's name, lower case, plus its skin tone for skin-tone variants ("waving hand,
medium skin tone"). Categories with fewer than 20 images (Component) are left out.
"""

from __future__ import annotations

import argparse
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

TONES = {"1F3FB": "light", "1F3FC": "medium-light", "1F3FD": "medium", "1F3FE": "medium-dark", "1F3FF": "dark"}
MIN_PER_CATEGORY = 20


def tone_text(key: str) -> str:
    return " and ".join(f"{TONES[part]} skin tone" for part in key.split("-") if part in TONES)


def entries(data: list[dict]) -> list[tuple[str, str, str]]:
    """(category, image file name, caption) of every image the package ships."""
    out = []
    for emoji in data:
        name = (emoji.get("name") or emoji["short_names"][0].replace("_", " ")).lower()
        if emoji.get("has_img_twitter", True):
            out.append((emoji["category"], emoji["image"], name))
        for key, variant in (emoji.get("skin_variations") or {}).items():
            if variant.get("has_img_twitter", True):
                out.append((emoji["category"], variant["image"], f"{name}, {tone_text(key)}"))
    counts = Counter(category for category, _, _ in out)
    return [e for e in out if counts[e[0]] >= MIN_PER_CATEGORY]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package", help="the npm tarball (npm pack emoji-datasource-twitter)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    with tarfile.open(args.package) as tar:
        members = {m.name: m for m in tar.getmembers()}
        data = json.load(tar.extractfile(members["package/emoji.json"]))
        folder = next(n.rsplit("/", 1)[0] for n in members if re.fullmatch(r"package/img/[a-z]+/64/[^/]+\.png", n))
        written = Counter()
        for category, image, caption in entries(data):
            member = members.get(f"{folder}/{image}")
            if member is None:
                continue
            target = out / re.sub(r"[^a-z0-9]+", "_", category.lower()).strip("_")
            target.mkdir(parents=True, exist_ok=True)
            (target / image).write_bytes(tar.extractfile(member).read())
            (target / image).with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
            written[target.name] += 1
    print(f"{sum(written.values())} images in {len(written)} categories under {out}: {dict(written.most_common())}")


if __name__ == "__main__":
    main()
