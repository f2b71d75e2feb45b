"""Download throughput: `clipsift pool download` against img2dataset called directly, same settings, one run.

    python bench/download.py [--images 2000] [--repeats 2] [--processes 2] [--threads 32] [--shard-size 500]

A local HTTP server (127.0.0.1, in this process) serves generated JPEGs, most of them larger than
--image-size so that they are resized as in DataComp. Each repeat times img2dataset.download with
`download.img2dataset_settings` and then `download_pool` (plan + img2dataset + adopting the shards
into a pool), alternating which goes first; both include img2dataset's process start-up. Prints
images/s for each (best repeat) and the ratio of clipsift's time to img2dataset's (goal: <= 1.1).
Because wall times on a shared machine vary from run to run, it also prints the seconds each clipsift
run spends outside img2dataset (its own stages) and that run's ratio to the img2dataset call inside it.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402

from clipsift.pipeline import download  # noqa: E402
from clipsift.pipeline.download import DownloadSettings, download_pool, img2dataset_settings  # noqa: E402
from clipsift.pipeline.pool import Pool, derive_uid  # noqa: E402

SIZES = [(640, 480), (1024, 768), (480, 640), (300, 200)]  # three of four get resized to 512


def make_images(count: int = 16) -> list[bytes]:
    images = []
    for i in range(count):
        width, height = SIZES[i % len(SIZES)]
        image = Image.radial_gradient("L").resize((width, height)).convert("RGB")
        image.paste((40 * i % 256, 90, 160), (0, 0, width // 3, height // 3))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 256

    def __init__(self, images: list[bytes]):
        super().__init__(("127.0.0.1", 0), Handler)
        self.images = images
        threading.Thread(target=self.serve_forever, daemon=True).start()


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.0"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        index = int(self.path.rsplit("/", 1)[-1].split(".")[0])
        body = self.server.images[index % len(self.server.images)]
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument(
        "--dir", default=None, help="Scratch directory (default: a temporary one, removed at the end)."
    )
    args = parser.parse_args()
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="clipsift-bench-download-"))
    server = Server(make_images())
    urls = [f"http://127.0.0.1:{server.server_address[1]}/img/{i}.jpg" for i in range(args.images)]
    table = pa.table(
        {
            "url": urls,
            "caption": [f"generated image {i}" for i in range(args.images)],
            "uid": [derive_uid(u) for u in urls],
        }
    )
    scratch.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, scratch / "urls.parquet")
    common = dict(
        image_size=args.image_size,
        shard_size=args.shard_size,
        processes=args.processes,
        threads=args.threads,
        retries=2,
        timeout=10,
        blur_faces=True,
        verify_sha256=False,
    )
    settings = img2dataset_settings(**common, bbox=False)

    def direct() -> None:
        import img2dataset

        shutil.rmtree(scratch / "img2dataset", ignore_errors=True)
        img2dataset.download(
            url_list=str(scratch / "urls.parquet"), output_folder=str(scratch / "img2dataset"), **settings
        )

    inner: list[float] = []  # img2dataset's share of each clipsift run
    run_img2dataset = download.run_img2dataset

    def timed_img2dataset(*args, **kwargs) -> None:
        inner.append(timed(lambda: run_img2dataset(*args, **kwargs)))

    download.run_img2dataset = timed_img2dataset

    def clipsift() -> None:
        shutil.rmtree(scratch / "pool", ignore_errors=True)
        download_pool(str(scratch / "urls.parquet"), str(scratch / "pool"), DownloadSettings(**common), workers=1)

    try:
        import img2dataset  # noqa: F401  (imported once before timing: both runs then start equal)

        times: dict[str, list[float]] = {"img2dataset": [], "clipsift": []}
        for repeat in range(args.repeats):
            order = [("img2dataset", direct), ("clipsift", clipsift)]
            for name, fn in order if repeat % 2 == 0 else order[::-1]:
                times[name].append(timed(fn))
        stored = Pool(str(scratch / "pool")).info["num_samples"]
        assert stored == args.images, f"the pool holds {stored} of {args.images} images"
        best = {name: min(values) for name, values in times.items()}
        print(
            f"download of {args.images:,} images from a local server on {os.cpu_count()} cores ({args.processes} "
            f"processes x {args.threads} threads, {args.shard_size} per shard, image size {args.image_size})"
        )
        for name, values in times.items():
            runs = ", ".join(f"{v:.1f}" for v in values)
            print(
                f"  {name:<12} {args.images / best[name]:>8,.0f} images/s   best {best[name]:.2f} s "
                f"(median {statistics.median(values):.2f} s; runs {runs} s)"
            )
        print(
            f"  ratio clipsift / img2dataset time: {best['clipsift'] / best['img2dataset']:.3f} (best), "
            f"{statistics.median(times['clipsift']) / statistics.median(times['img2dataset']):.3f} "
            "(median); goal <= 1.1"
        )
        own = [total - i2d for total, i2d in zip(times["clipsift"], inner)]
        print(
            "  clipsift's own stages (plan, adopt, status, pool.json) per run: "
            f"{', '.join(f'{o:.2f}' for o in own)} s; ratio of each clipsift run to the img2dataset "
            f"call inside it: {', '.join(f'{t / i:.3f}' for t, i in zip(times['clipsift'], inner))}"
        )
    finally:
        server.shutdown()
        if not args.dir:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
