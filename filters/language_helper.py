"""Language ID spread over helper processes, for a pool's first English-only recipe run in one process.

fastText and CLD3 hold the GIL for their whole call (two threads take longer than one), and a pool's first
language-ID run spends most of its time in them (about 5 us a caption with lid.176, 20 us with CLD3). When
`map_shards` runs shards in this process one at a time, the cores its threads would have used are spare
(pipeline/parallel.py `spare_cores`): each spare core gets a helper process that loads the same model, and a
large batch of captions is cut into equal parts, one for this process and one for each ready helper.

A helper is `python -c ...` importing language_models.py only (about 0.1 s to start and load its model), started
on the first large batch and used once it says it is ready, so no batch waits for it. It reads batches from its
stdin and writes labels to its stdout, and ends when its stdin closes (this process ending included). Protocol,
both ways: a line `<count> <bytes>\\n`, then `bytes` of UTF-8: the count captions (or labels) joined by \\n.
Captions reach the models without newlines (DataComp's replacement), so \\n cannot occur inside one.

The labels are the same model's on the same text, wherever computed. A helper that fails (ends, answers
wrongly, or is silent for ANSWER_SECONDS) is stopped and its part done here; no other helper is started for that
model in this process. A batch interrupted here (KeyboardInterrupt...) stops the helpers whose answers it did
not read, so no answer is ever taken for another batch's.
Memory: a batch's captions and labels, once more per helper.
"""

from __future__ import annotations

import atexit
import logging
import os
import select
import subprocess
import sys
import threading

from clipsift.filters import language_models

MIN_BATCH = 2048  # captions below which a batch stays here: 10-40 ms of model time, not worth the copying
_HELPER_CODE = (  # without the working directory on sys.path: a `clipsift` folder there would shadow the package
    "import sys\nif not getattr(sys.flags, 'safe_path', False): del sys.path[0]\n"
    "from clipsift.filters.language_helper import serve; serve(sys.argv[1])"
)
ANSWER_SECONDS = 60.0  # a helper silent this long after a batch is given up (its part is done here)
log = logging.getLogger(__name__)


class Helper:
    """One helper process serving one model."""

    def __init__(self, identifier: str) -> None:
        self.identifier = identifier
        self.process = subprocess.Popen(
            [sys.executable, "-c", _HELPER_CODE, identifier],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.ready = False
        self.failed = False
        self.captions = 0  # identified by this helper so far

    def is_ready(self) -> bool:
        """Whether it has loaded its model (without waiting for it)."""
        if not self.ready and not self.failed:
            if select.select([self.process.stdout], [], [], 0)[0]:
                self.ready = self.process.stdout.readline() == b"ready\n"
                self.failed = not self.ready
        return self.ready

    def send(self, lines: list[str]) -> None:
        _write(self.process.stdin, lines)

    def receive(self, count: int) -> list[str]:
        if not select.select([self.process.stdout], [], [], ANSWER_SECONDS + count * 1e-3)[0]:
            raise OSError(f"language helper {self.process.pid} did not answer")
        labels = _read(self.process.stdout)
        if labels is None or len(labels) != count:
            raise OSError(f"language helper {self.process.pid} answered {labels and len(labels)} labels for {count}")
        self.captions += count
        return labels

    def stop(self) -> None:
        self.failed = True
        try:
            self.process.stdin.close()
            self.process.wait(timeout=2)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


_helpers: dict[str, list[Helper]] = {}
_gave_up: set[str] = set()  # models one of whose helpers failed: no more helpers for them in this process
_lock = threading.Lock()


def helpers(identifier: str) -> list[Helper]:
    """This process's helpers for `identifier`, started up to spare_cores() (none on a platform without select on
    pipes)."""
    from clipsift.pipeline.parallel import spare_cores

    wanted = spare_cores() if os.name == "posix" else 0
    if not wanted:
        return []
    running = _helpers.setdefault(identifier, [])
    if any(helper.failed for helper in running):
        _gave_up.add(identifier)
    while len(running) < wanted and identifier not in _gave_up:
        running.append(Helper(identifier))
    return [helper for helper in running[:wanted] if not helper.failed]


def identify(lines: list[str], identifier: str) -> list[str]:
    """language_models.identify, with the batch spread over this process and its ready helpers when it is large
    and cores are spare."""
    if len(lines) < MIN_BATCH or not _lock.acquire(blocking=False):
        return language_models.identify(lines, identifier)
    try:
        ready = [helper for helper in helpers(identifier) if helper.is_ready()]
        if not ready:
            return language_models.identify(lines, identifier)
        cuts = [len(lines) * part // (len(ready) + 1) for part in range(len(ready) + 2)]
        sent = []
        try:
            for helper, start, end in zip(ready, cuts[1:], cuts[2:]):
                sent.append((helper, start, end, _try(helper.send, helper, lines[start:end])))
            labels = language_models.identify(lines[: cuts[1]], identifier)
            while sent:
                helper, start, end, ok = sent[0]
                theirs = _try(helper.receive, helper, end - start) if ok else None
                sent.pop(0)
                labels += theirs if theirs is not None else language_models.identify(lines[start:end], identifier)
            return labels
        finally:  # interrupted (KeyboardInterrupt, MemoryError...): an unread answer must not become the next one's
            for helper, *_ in sent:
                helper.stop()
                _helpers[identifier].remove(helper)  # not a failure of the helper: another may start
    finally:
        _lock.release()


def _try(call, helper: Helper, argument):
    """call(argument), or None (and the helper stopped) when the helper has failed."""
    try:
        result = call(argument)
    except (OSError, ValueError) as err:
        log.warning("language helper for %s failed (%s); its captions are identified here", helper.identifier, err)
        helper.stop()
        return None
    return True if result is None else result


def _write(stream, items: list[str]) -> None:
    payload = "\n".join(items).encode()
    stream.write(b"%d %d\n" % (len(items), len(payload)))
    stream.write(payload)
    stream.flush()


def _read(stream) -> list[str] | None:
    """A batch written by _write, or None at the end of the stream."""
    header = stream.readline().split()
    if len(header) != 2:
        return None
    count, size = int(header[0]), int(header[1])
    payload = stream.read(size)
    if len(payload) != size:
        return None
    return payload.decode().split("\n") if count else []


def serve(identifier: str) -> None:
    """A helper's life: load the model, say so, then answer batches until stdin closes."""
    language_models.load(identifier)
    out, into = sys.stdout.buffer, sys.stdin.buffer
    out.write(b"ready\n")
    out.flush()
    while (lines := _read(into)) is not None:
        _write(out, language_models.identify(lines, identifier))


@atexit.register
def stop_helpers() -> None:
    """Stop every helper of this process (at its exit; tests, between tests)."""
    for running in _helpers.values():
        for helper in running:
            helper.stop()
    _helpers.clear()
    _gave_up.clear()
