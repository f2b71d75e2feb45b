"""cld3-py (what clipsift installs) against gcld3 3.0.13 (what DataComp's LAION-2B reproduction calls), caption by
caption, in one run.

    pip install --target /tmp/gcld3site --no-deps gcld3==3.0.13   # builds; needs protobuf-compiler libprotobuf-dev
    python bench/cld3_identity.py --gcld3-site /tmp/gcld3site [--captions 50000]

Both packages import as `gcld3`, so each side runs in its own subprocess (the other package's folder first on
sys.path) and writes (language, probability, is_reliable) per caption, called as DataComp calls it:
NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000), newlines replaced by spaces. The captions: the
DataComp fixture's English, foreign-language and odd captions, plus random mixtures of their words (1-13
words, scripts mixed), so that short, long, mixed and ambiguous inputs all occur. Prints how many differ.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SIDE = r"""
import json, sys
import gcld3
model = gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)
texts = json.load(open(sys.argv[1]))
out = []
for text in texts:
    result = model.FindLanguage(text=text.replace("\n", " "))
    out.append([result.language, result.probability, result.is_reliable])
json.dump({"module": gcld3.__file__, "results": out}, open(sys.argv[2], "w"))
"""


def captions(count: int) -> list[str]:
    import numpy as np

    sys.path.insert(0, str(ROOT / "tests"))
    from datacomp_fixture import ENGLISH, FOREIGN, ODD

    base = list(ENGLISH + FOREIGN + ODD)
    words = [word for text in base for word in text.split()] + list("海滩上玩耍的狗夕暮れのビーチで遊ぶ犬")
    rng = np.random.default_rng(0)
    mixed = [" ".join(words[i] for i in rng.integers(0, len(words), rng.integers(1, 14))) for _ in range(count)]
    return base + mixed


def run_side(texts_file: Path, site: str | None, out: Path) -> dict:
    env = dict(os.environ)
    if site:
        env["PYTHONPATH"] = os.pathsep.join([site, env.get("PYTHONPATH", "")])
    subprocess.run([sys.executable, "-c", SIDE, str(texts_file), str(out)], env=env, check=True)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gcld3-site", required=True, help="a folder holding gcld3 3.0.13 (pip install --target)")
    parser.add_argument("--captions", type=int, default=50_000)
    args = parser.parse_args()
    texts = captions(args.captions)
    with tempfile.TemporaryDirectory() as tmp:
        texts_file = Path(tmp, "texts.json")
        texts_file.write_text(json.dumps(texts))
        ours = run_side(texts_file, None, Path(tmp, "ours.json"))
        theirs = run_side(texts_file, args.gcld3_site, Path(tmp, "theirs.json"))
    if ours["module"] == theirs["module"]:
        raise SystemExit(f"both sides imported {ours['module']}: give --gcld3-site a folder with gcld3 in it")
    pairs = list(zip(ours["results"], theirs["results"]))
    languages = sum(a[0] != b[0] for a, b in pairs)
    any_field = sum(a != b for a, b in pairs)
    print(f"clipsift's CLD3: {ours['module']}\nreference gcld3: {theirs['module']}")
    print(f"{len(pairs):,} captions, {len({a[0] for a, _ in pairs})} languages found")
    print(f"other language: {languages:,}; other language, probability or reliability: {any_field:,}")


if __name__ == "__main__":
    main()
