"""The wheels the lent GPU machine lacks, for `bench/gpu_check.sh`; run here, where pip reaches PyPI.

    python bench/gpu_wheels.py [--out .whl]

The device image (Python 3.12 with PyTorch, torchvision, pyarrow, pandas, typer, rich, timm, ...:
/work/.library/device/KINDS.md) has no Ray, open_clip, pydantic, jsonschema or webdataset. This
downloads their cp312 manylinux wheels at the versions installed here and drops Ray's Java jar from
its wheel (32 MB of 79; Python workers never load it), so that all of them fit the 64 MiB that one
device call carries. The folder is git-ignored; name it in the call's `carry`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGES = (
    "ray",
    "open_clip_torch",
    "ftfy",
    "wcwidth",
    "pydantic",
    "pydantic_core",
    "annotated_types",
    "typing_inspection",
    "jsonschema",
    "jsonschema_specifications",
    "referencing",
    "rpds_py",
    "webdataset",
    "braceexpand",
)
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
CARRY_LIMIT = 64 * 2**20


def download(out: Path) -> None:
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in PACKAGES]
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.12",
            "--implementation",
            "cp",
            *platforms,
            "--dest",
            str(out),
            *pins,
        ],
        check=True,
    )


def drop_members(wheel: Path, prefix: str) -> None:
    """Rewrite `wheel` without the members under `prefix` (pip installs what is there; RECORD may list more)."""
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            if not info.filename.startswith(prefix):
                target.writestr(info, source.read(info))
    slim.replace(wheel)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".whl")
    out = Path(parser.parse_args().out)
    out.mkdir(exist_ok=True)
    download(out)
    for wheel in out.glob("ray-*.whl"):
        drop_members(wheel, "ray/jars/")
    wheels = sorted(out.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    for wheel in wheels:
        print(f"  {wheel.stat().st_size / 2**20:6.1f} MiB  {wheel.name}")
    print(
        f"{len(wheels)} wheels, {total / 2**20:.1f} MiB in {out}/ (a device "
        f"call carries {CARRY_LIMIT / 2**20:.0f} MiB with the working tree)"
    )
    if total > CARRY_LIMIT:
        sys.exit("too large for one device call")


if __name__ == "__main__":
    main()
