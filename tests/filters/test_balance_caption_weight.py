"""balance (MetaCLIP), caption_quality and weight steps (weighted subsets), each against a brute-force oracle."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipsift.filters.balance import _SALT, MatchShard, count_entries, read_entries
from clipsift.filters.base import Context, Inputs, RecipeError
from clipsift.filters.caption_quality import BOILERPLATE, CaptionQuality, repetition_shares
from clipsift.filters.recipe import RecipeRunner, apply_recipe, load_recipe
from clipsift.filters.subset import decode_uids, read_subset, subset_info
from clipsift.pipeline.pool import BASE_SCHEMA, Pool, derive_uid, finalize_pool, write_metadata
from clipsift.pipeline.reshard import reshard

from conftest import clipsift
from filter_support import build_pool, write_model

MASK64 = (1 << 64) - 1


# --------------------------------------------------------------------------- helpers


def text_pool(root: Path, texts: list[str | None], per_shard: int) -> Pool:
    """A metadata-only pool of these captions, row n with uid derive_uid(f"row/{n}")."""
    for index, start in enumerate(range(0, len(texts), per_shard)):
        part = texts[start : start + per_shard]
        columns = {name: pa.nulls(len(part), field.type) for name, field in zip(BASE_SCHEMA.names, BASE_SCHEMA)}
        columns["uid"] = pa.array([derive_uid(f"row/{n}") for n in range(start, start + len(part))])
        columns["text"] = pa.array(part, pa.string())
        write_metadata(str(root), index, pa.table(columns))
    finalize_pool(str(root), "test", [{"kind": "test"}])
    return Pool(str(root))


def recipe_file(tmp_path: Path, text: str, name: str = "r") -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return str(path)


def apply(pool: Pool, tmp_path: Path, text: str, name: str = "r") -> tuple[list[str], dict]:
    """The subset's uids (repeats kept, file order) and its subset.json."""
    out = tmp_path / f"{name}.npy"
    apply_recipe(pool.url, load_recipe(recipe_file(tmp_path, text, name)), str(out), workers=1)
    return decode_uids(read_subset(str(out))), json.loads((tmp_path / f"{name}.json").read_text())


def states(pool: Pool, tmp_path: Path, text: str, name: str = "states") -> dict:
    runner = RecipeRunner(pool, str(tmp_path / f"work-{name}"), 1, None)
    runner.evaluate(load_recipe(recipe_file(tmp_path, text, name)).root, None)
    return runner.states


def mix(x: int) -> int:
    """splitmix64's finaliser on a Python int (the oracle of the vectorised one)."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def uniform(uid: str, seed: int) -> float:
    key = mix(int(uid[:16], 16) ^ mix(int(uid[16:], 16) ^ mix((seed & MASK64) ^ int(_SALT))))
    return (key >> 11) / 2.0**53


def occurs(text: str, entry: str, match: str) -> bool:
    """Whether `entry` occurs in `text` (both lower-cased), by scanning every position."""
    text, entry = text.lower(), entry.lower()
    for start in range(len(text) - len(entry) + 1):
        if text[start : start + len(entry)] != entry:
            continue
        if match == "substring":
            return True
        before = text[start - 1] if start else " "
        after = text[start + len(entry)] if start + len(entry) < len(text) else " "
        if not (before.isalnum() or before == "_") and not (after.isalnum() or after == "_"):
            return True
    return False


def brute_counts(texts: list[str | None], entries: list[str], match: str) -> tuple[list[str], list[int], list[list]]:
    """(distinct entries, rows matching each, each row's matched entry indices)."""
    names = list(dict.fromkeys(e.strip().lower() for e in entries if e.strip()))
    matched = [[i for i, e in enumerate(names) if t and occurs(t, e, match)] for t in texts]
    return names, [sum(i in m for m in matched) for i in range(len(names))], matched


WORDS = ["cat", "dog", "hot dog", "bird", "category", "red", "star", "fish", "a"]


def caption_rows(n: int, seed: int) -> list[str | None]:
    """Captions with Zipf-like word frequencies, plus a few without any entry and a missing one."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, len(WORDS) + 1) ** 1.2
    texts: list[str | None] = []
    for i in range(n):
        if i % 17 == 0:
            texts.append("zzz qqq" if i % 34 else None)
            continue
        picks = rng.choice(len(WORDS), size=int(rng.integers(1, 4)), p=weights / weights.sum())
        texts.append(" ".join(["photo of", *(WORDS[p] for p in picks), "now"]))
    return texts


# --------------------------------------------------------------------------- balance


@pytest.mark.parametrize("match", ["substring", "words"])
def test_balance_counts_and_keep_probability_match_brute_force(tmp_path: Path, match: str) -> None:
    texts = caption_rows(240, 1) + ["CONCATENATE the Cat!", "hot dogs", "a category"]
    pool = text_pool(tmp_path / "pool", texts, per_shard=70)
    entries = ["cat", "Dog", "hot dog", "bird", "category", "red", " fish ", "cat", "", "a"]
    recipe = f"steps:\n  - balance: {{entries: {json.dumps(entries)}, t: 9, match: {match}, seed: 3}}\n"
    state = states(pool, tmp_path, recipe)["1"]
    names, counts, matched = brute_counts(texts, entries, match)
    assert state.counts.tolist() == counts
    assert state.matched_rows == sum(bool(m) for m in matched) and state.input_rows == len(texts)
    uids = [derive_uid(f"row/{n}") for n in range(len(texts))]
    probability = [min(1.0, 9 / min(counts[i] for i in m)) if m else 0.0 for m in matched]
    assert state.expected == pytest.approx(sum(probability))
    wanted = sorted(u for u, p in zip(uids, probability) if uniform(u, 3) < p)
    kept, _ = apply(pool, tmp_path, recipe)
    assert kept == wanted
    assert 0 < len(kept) < sum(bool(m) for m in matched)  # some rows of head entries go, rare ones stay


def test_balance_any_entry_draw_and_unmatched_keep(tmp_path: Path) -> None:
    texts = caption_rows(300, 2)
    pool = text_pool(tmp_path / "pool", texts, per_shard=100)
    recipe = f"steps:\n  - balance: {{entries: {json.dumps(WORDS)}, t: 15, draw: any, unmatched: keep}}\n"
    state = states(pool, tmp_path, recipe)["1"]
    _, counts, matched = brute_counts(texts, WORDS, "substring")
    miss = [math.prod(1 - min(1.0, 15 / counts[i]) for i in m) for m in matched]
    assert state.expected == pytest.approx(sum(1 - q if m else 1.0 for q, m in zip(miss, matched)))
    wanted = []
    for n, m in enumerate(matched):
        uid = derive_uid(f"row/{n}")
        row_key = int(uniform(uid, 0) * 2.0**53)  # the row's own draw, as an integer
        draws = [(mix(row_key ^ mix((i + int(_SALT)) & MASK64)) >> 11) / 2.0**53 for i in m]
        if not m or any(d < min(1.0, 15 / counts[i]) for d, i in zip(draws, m)):
            wanted.append(uid)
    kept = apply(pool, tmp_path, recipe)[0]
    assert kept == sorted(wanted)
    assert sum(not m for m in matched) < len(kept) < len(texts)


def test_balance_expected_count_is_observed_within_binomial_tolerance(tmp_path: Path) -> None:
    texts = caption_rows(20_000, 7)
    pool = text_pool(tmp_path / "pool", texts, per_shard=10_000)
    recipe = f"steps:\n  - balance: {{entries: {json.dumps(WORDS)}, t: 1500, match: words, seed: 11}}\n"
    state = states(pool, tmp_path, recipe)["1"]
    _, counts, matched = brute_counts(texts, WORDS, "words")
    p = np.array([min(1.0, 1500 / min(counts[i] for i in m)) for m in matched if m])
    assert state.expected == pytest.approx(p.sum())
    kept, _ = apply(pool, tmp_path, recipe)
    assert abs(len(kept) - p.sum()) <= 4 * math.sqrt((p * (1 - p)).sum())  # 4 standard deviations
    assert len(kept) < 0.7 * len(p)  # the head entries were cut


def test_balance_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    pool = text_pool(tmp_path / "pool", caption_rows(400, 3), per_shard=150)
    recipe = "steps:\n  - balance: {{entries: {}, t: 20, seed: {}}}\n"
    first = apply(pool, tmp_path, recipe.format(json.dumps(WORDS), 5), "a")[0]
    again = apply(pool, tmp_path, recipe.format(json.dumps(WORDS), 5), "b")[0]
    other = apply(pool, tmp_path, recipe.format(json.dumps(WORDS), 6), "c")[0]
    resharded = text_pool(tmp_path / "pool2", caption_rows(400, 3), per_shard=33)  # the same rows, other shards
    assert first == again == apply(resharded, tmp_path, recipe.format(json.dumps(WORDS), 5), "d")[0]
    assert first != other


def test_balance_words_against_substring(tmp_path: Path) -> None:
    texts = ["concatenate", "a cat.", "cats", "cat_x", "Cat", "c++ code", "bobcat food", "nothing"]
    pool = text_pool(tmp_path / "pool", texts, per_shard=8)
    entries = tmp_path / "entries.txt"
    entries.write_text("cat\nC++\n\n")
    for match, rows in (("substring", [0, 1, 2, 3, 4, 5, 6]), ("words", [1, 4, 5])):
        recipe = f"steps:\n  - balance: {{entries: {entries}, t: 100, match: {match}}}\n"
        assert apply(pool, tmp_path, recipe, match)[0] == sorted(derive_uid(f"row/{n}") for n in rows)
    keep = f"steps:\n  - balance: {{entries: {entries}, t: 100, match: words, unmatched: keep}}\n"
    assert len(apply(pool, tmp_path, keep, "keep")[0]) == len(texts)


def test_balance_entries_from_a_suite(tmp_path: Path) -> None:
    data = tmp_path / "data" / "toy" / "birds" / "test"
    data.mkdir(parents=True)
    (data / "nshards.txt").write_text("0\n")
    (data.parent / "classnames.txt").write_text("Robin\nwren\n")
    (data.parent / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "suite: toy\nversion: 1\ndownload: make DATA_DIR\ngroups: {}\ntasks:\n"
        "  - {key: toy/animals, type: classification, metric: acc1, classnames: [Cat, hot dog]}\n"
        "  - {key: toy/birds, type: classification, metric: acc1}\n"
        "  - {key: toy/retrieval, type: retrieval, metric: mean_recall@1}\n"
    )
    assert read_entries(f"suite:{suite}", str(tmp_path / "data"), "here") == ["cat", "hot dog", "robin", "wren"]
    with pytest.raises(RecipeError, match="suite_data"):
        read_entries(f"suite:{suite}", str(tmp_path / "nowhere"), "here")
    pool = text_pool(tmp_path / "pool", ["a cat", "a wren", "a dog"], per_shard=3)
    missing = load_recipe(recipe_file(tmp_path, "steps:\n  - balance: {entries: missing.txt}\n", "missing"))
    with pytest.raises(RecipeError, match="step 1 \\(balance\\): entries 'missing.txt' is not a file"):
        apply_recipe(pool.url, missing, str(tmp_path / "missing.npy"), workers=1)
    recipe = f"steps:\n  - balance: {{entries: 'suite:{suite}', suite_data: {tmp_path / 'data'}, t: 5}}\n"
    assert apply(pool, tmp_path, recipe)[0] == sorted(derive_uid(f"row/{n}") for n in (0, 1))


def test_balance_resumes_matching_with_the_shards_it_lacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run killed while matching (some shards without a match file) re-matches only those shards; files made from
    other entries, another match mode or other input rows are matched again."""
    texts = caption_rows(300, 4)
    pool = text_pool(tmp_path / "pool", texts, per_shard=60)
    shards = pool.shard_ids()
    matched: list[str] = []
    real = MatchShard.__call__
    monkeypatch.setattr(MatchShard, "__call__", lambda task, shard: matched.append(shard) or real(task, shard))
    work = str(tmp_path / "work" / "step-1")

    def counts(entries: list[str] = WORDS, match: str = "substring", inputs: Inputs | None = None) -> list[int]:
        matched.clear()
        context = Context(pool, inputs or Inputs(pool), work, workers=1)
        return count_entries(context, entries, None, match, "here").counts.tolist()

    assert counts() == brute_counts(texts, WORDS, "substring")[1] and matched == shards
    for shard in ("00000001", "00000003"):  # killed before these were matched
        Path(tmp_path / "work" / "step-1.balance" / f"{shard}.npz").unlink()
    assert counts() == brute_counts(texts, WORDS, "substring")[1] and matched == ["00000001", "00000003"]
    assert counts() == brute_counts(texts, WORDS, "substring")[1] and matched == []

    assert counts(WORDS[:-1]) == brute_counts(texts, WORDS[:-1], "substring")[1] and matched == shards
    assert counts(WORDS[:-1], "words") == brute_counts(texts, WORDS[:-1], "words")[1] and matched == shards
    dropped = {n for n in range(120, 180) if n % 3 == 0}  # shard 2 loses a third of its rows to an earlier step

    def mask(shard: str) -> np.ndarray:
        return np.array([n not in dropped for n in range(60 * int(shard), 60 * int(shard) + 60)])

    left = [None if n in dropped else t for n, t in enumerate(texts)]
    assert counts(WORDS[:-1], "words", Inputs(pool, mask)) == brute_counts(left, WORDS[:-1], "words")[1]
    assert matched == ["00000002"]


# --------------------------------------------------------------------------- caption_quality


def brute_shares(text: str | None, n: int) -> tuple[float, float]:
    words = re.findall(r"[^\W_]+", (text or "").lower())
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    share = [1 - len(set(items)) / len(items) if items else 0.0 for items in (words, grams)]
    return share[0], share[1]


def test_repetition_shares_match_brute_force() -> None:
    rng = np.random.default_rng(4)
    vocabulary = ["dog", "Dog,", "cat", "a", "b", "ÉTÉ", "x1", "the", "--"]
    texts = [" ".join(rng.choice(vocabulary, size=int(rng.integers(0, 12)))) for _ in range(400)]
    texts += [None, "", "   ", "dog dog", "a b c a b c a b c"]
    for n in (2, 3):
        words, grams = repetition_shares(pa.chunked_array([texts[:200], texts[200:]]), n)
        expected = np.array([brute_shares(t, n) for t in texts])
        assert np.allclose(words, expected[:, 0]) and np.allclose(grams, expected[:, 1])


CAPTIONS = {  # caption -> the rules that drop it
    "a red star on a blue background": set(),
    "Stock image: a red star (grey backdrop)": set(),
    "buy buy buy cheap cheap": {"repeated_words"},
    "big red sale big red sale big red sale today": {"repeated_words", "repeated_ngrams"},
    "red star blue moon red star blue moon": {"repeated_ngrams"},  # words 0.5 (not above), trigrams 2/6
    "IMG_1234.JPG": {"boilerplate"},
    "DSC01234": {"boilerplate"},
    "untitled-5.jpg": {"boilerplate"},
    "Loading...": {"boilerplate"},
    "thumbnail": {"boilerplate"},
    "Product image 3": {"boilerplate"},
    "photo of a dog, click to enlarge": {"boilerplate"},
    "Image may contain: one person, smiling": {"boilerplate"},
    "woman smiling - stock photo": {"boilerplate"},
    "no description available": {"boilerplate"},
    "https://example.com/a.jpg": {"url_only"},
    "www.example.com http://x.org": {"url_only"},
    "visit https://example.com for red stars": set(),
    "2019": {"no_letters"},
    "--- !!! 42": {"no_letters"},
    "": {"no_letters"},
    "SALE today on red stars": {"patterns"},
}


def test_caption_quality_each_rule() -> None:
    texts = list(CAPTIONS)
    rules = CaptionQuality(patterns=[r"^sale\b"]).rejected(pa.chunked_array([texts]))
    assert set(rules) == {"repeated_words", "repeated_ngrams", "boilerplate", "patterns", "url_only", "no_letters"}
    for rule, dropped in rules.items():
        assert [t for t, d in zip(texts, dropped) if d] == [t for t, r in CAPTIONS.items() if rule in r], rule
    off = CaptionQuality(max_repeated_words=None, max_repeated_ngrams=None, boilerplate=False, url_only=False)
    assert set(off.rejected(pa.chunked_array([texts]))) == {"no_letters"}
    assert len(BOILERPLATE) >= 8


def test_caption_quality_in_a_recipe(tmp_path: Path) -> None:
    texts = [*CAPTIONS, None]
    pool = text_pool(tmp_path / "pool", texts, per_shard=10)
    kept, _ = apply(
        pool, tmp_path, "steps:\n  - caption_quality: {patterns: ['^sale\\b'], max_repeated_ngrams: null}\n"
    )
    clean = [n for n, t in enumerate(texts) if t is not None and not (CAPTIONS[t] - {"repeated_ngrams"})]
    assert kept == sorted(derive_uid(f"row/{n}") for n in clean)
    with pytest.raises(RecipeError, match="not a valid RE2"):
        load_recipe(recipe_file(tmp_path, "steps:\n  - caption_quality: {patterns: ['(unclosed']}\n", "bad"))


# --------------------------------------------------------------------------- weight


def scored_pool(tmp_path: Path, n: int = 240) -> tuple[Pool, np.ndarray]:
    rng = np.random.default_rng(9)
    scores = np.round(rng.normal(0.25, 0.05, n), 2).astype(np.float32)  # rounded: many ties
    scores[rng.choice(n, 12, replace=False)] = np.nan
    pool = text_pool(tmp_path / "pool", caption_rows(n, 5), per_shard=100)
    write_model(pool, "m", scores)
    return pool, scores


def rank_thresholds(scores: np.ndarray, bins: list[float]) -> list[float]:
    """DataComp's threshold at each cumulative fraction (rank int(N f) of the scores sorted descending, NaN last)."""
    ranked = sorted((float(s) for s in scores if not np.isnan(s)), reverse=True)
    ranked += [float("-inf")] * (len(scores) - len(ranked))
    edges = np.cumsum(bins)
    return [ranked[int(len(scores) * e)] if int(len(scores) * e) < len(scores) else -math.inf for e in edges]


def brute_quantile_copies(
    scores: np.ndarray, bins: list[float], counts: list[int], listed: np.ndarray | None = None
) -> list[int]:
    """Copies by the first bin whose threshold (over `listed`, default the scores themselves) a score reaches;
    the rest get counts[-1], rows without a score none."""
    thresholds = rank_thresholds(scores if listed is None else listed, bins)
    copies = []
    for s in scores:
        hit = [i for i, thr in enumerate(thresholds) if s >= thr]
        copies.append(0 if np.isnan(s) else counts[hit[0]] if hit else counts[-1])
    return copies


def test_weight_by_score_quantile_against_brute_force(tmp_path: Path) -> None:
    pool, scores = scored_pool(tmp_path)
    for name, counts in (("w", [3, 2, 1]), ("w0", [2, 1, 0])):
        recipe = f"steps:\n  - weight: {{by: score_quantile, model_id: m, bins: [0.1, 0.2], counts: {counts}}}\n"
        uids, info = apply(pool, tmp_path, recipe, name)
        wanted = brute_quantile_copies(scores, [0.1, 0.2], counts)
        assert Counter(uids) == Counter({derive_uid(f"row/{n}"): c for n, c in enumerate(wanted) if c})
        assert uids == sorted(uids)  # the subset is sorted, repeats side by side
        assert info["num_uids"] == sum(wanted) == len(uids)
        assert info["num_unique_uids"] == sum(c > 0 for c in wanted)
        assert info["copies"] == {str(k): v for k, v in sorted(Counter(c for c in wanted if c).items())}
        assert info["steps"][0]["kept"] == sum(c > 0 for c in wanted)
        assert not {derive_uid(f"row/{n}") for n in np.flatnonzero(np.isnan(scores))} & set(uids)  # no score: 0
    assert Counter(wanted)[2] >= 0.1 * len(scores)  # ties at an edge go to the better bin


def datacomp_scored_pool(tmp_path: Path, rows: int = 230, dead: int = 70) -> tuple[Pool, np.ndarray, np.ndarray]:
    """A metadata-only pool with DataComp's float32 L/14 score column (some null) and POOL/absent/ rows (dead
    links, with scores too); returns the pool, its rows' scores and every listed row's (the pool's, then absent)."""
    rng = np.random.default_rng(13)
    scores = np.round(rng.normal(0.3, 0.04, rows + dead), 2).astype(np.float32)  # rounded: ties at the edges
    scores[rng.choice(rows + dead, 15, replace=False)] = np.nan
    root = tmp_path / "dcpool"
    for index, start in enumerate(range(0, rows, 100)):
        part = scores[start : min(start + 100, rows)]
        columns = {name: pa.nulls(len(part), field.type) for name, field in zip(BASE_SCHEMA.names, BASE_SCHEMA)}
        columns["uid"] = pa.array([derive_uid(f"row/{n}") for n in range(start, start + len(part))])
        columns["clip_l14_similarity_score"] = pa.array(part, pa.float32(), mask=np.isnan(part))
        write_metadata(str(root), index, pa.table(columns))
    (root / "absent").mkdir()
    lost = scores[rows:]
    table = pa.table(
        {
            "uid": [derive_uid(f"dead/{n}") for n in range(dead)],
            "clip_l14_similarity_score": pa.array(lost, pa.float32(), mask=np.isnan(lost)),
        }
    )
    pq.write_table(table, root / "absent" / "00000000.parquet")
    finalize_pool(str(root), "test", [{"kind": "test"}])
    return Pool(str(root)), scores[:rows], scores


def test_weight_bins_are_clip_scores_thresholds_counting_absent_rows(tmp_path: Path) -> None:
    pool, scores, listed = datacomp_scored_pool(tmp_path)
    model, bins = "ViT-L-14__openai", [0.1, 0.2]
    for absent in (True, False):
        more = "" if absent else ", count_absent: false"
        name = f"absent-{absent}"
        recipe = (
            f"steps:\n  - weight: {{by: score_quantile, model_id: {model}, bins: {bins}, counts: [3, 2, 1]{more}}}\n"
        )
        edges = states(pool, tmp_path, recipe, name)["1"]
        clip = [f"steps: [{{clip_score: {{model_id: {model}, fraction: {f!r}{more}}}}}]" for f in (0.1, 0.1 + 0.2)]
        thresholds = [states(pool, tmp_path, text, f"c{i}-{absent}")["1"] for i, text in enumerate(clip)]
        population = listed if absent else scores  # DataComp's N counts the dead links' metadata rows
        assert edges == thresholds == rank_thresholds(population, bins)
        uids, _ = apply(pool, tmp_path, recipe, name)
        wanted = brute_quantile_copies(scores, bins, [3, 2, 1], population)
        assert Counter(uids) == Counter({derive_uid(f"row/{n}"): c for n, c in enumerate(wanted) if c})
    assert rank_thresholds(listed, bins) != rank_thresholds(scores, bins)  # the absent rows move the edges


def test_weight_by_balance_against_brute_force(tmp_path: Path) -> None:
    texts = caption_rows(500, 6)
    pool = text_pool(tmp_path / "pool", texts, per_shard=200)
    _, counts, matched = brute_counts(texts, WORDS, "substring")
    recipe = "steps:\n  - weight: {{by: balance, entries: {}, t: 100, max_copies: {}, seed: 2}}\n"
    uids, info = apply(pool, tmp_path, recipe.format(json.dumps(WORDS), 3), "w")
    wanted = {}
    for n, m in enumerate(matched):
        if m:
            r = 100 / min(counts[i] for i in m)
            uid = derive_uid(f"row/{n}")
            wanted[uid] = min(3, math.floor(r) + (uniform(uid, 2) < r - math.floor(r)))
    assert Counter(uids) == Counter({u: c for u, c in wanted.items() if c})
    assert max(Counter(uids).values()) == 3 and info["copies"]["3"] > 0  # rare entries are upsampled
    once, _ = apply(pool, tmp_path, recipe.format(json.dumps(WORDS), 1), "once")
    balanced, _ = apply(
        pool, tmp_path, f"steps:\n  - balance: {{entries: {json.dumps(WORDS)}, t: 100, seed: 2}}\n", "b"
    )
    assert once == balanced  # max_copies 1 is the balance filter


def test_weighted_subset_info_and_reshard(tmp_path: Path) -> None:
    pool = build_pool(tmp_path / "pool", [{"text": f"a red star number {n}"} for n in range(12)], per_shard=5)
    write_model(pool, "m", np.linspace(0.1, 0.4, 12).astype(np.float32))
    recipe = "steps:\n  - weight: {by: score_quantile, model_id: m, bins: [0.25, 0.25], counts: [3, 2, 0]}\n"
    uids, info = apply(pool, tmp_path, recipe)
    copies = Counter(uids)
    # DataComp's edges: ranks int(12 * 0.25) = 3 and int(12 * 0.5) = 6 (0-based) are the last rows of their bins
    assert sorted(copies.values()) == [2, 2, 2, 3, 3, 3, 3]
    info_file = subset_info(str(tmp_path / "r.npy"))
    assert info_file.repeats == dict(Counter(copies.values())) == {2: 3, 3: 4}
    assert (info_file.count, info_file.unique, info_file.sorted) == (18, 7, True)
    shown = clipsift("subset", "info", str(tmp_path / "r.npy"))
    assert shown.returncode == 0 and re.search(r"copies\s+2x: 3, 3x: 4 uids", shown.stdout + shown.stderr)
    result = reshard(pool.url, str(tmp_path / "r.npy"), str(tmp_path / "shards"), shard_size=4, workers=1)
    assert result.num_samples == 18 and result.num_shards == 5
    out = Pool(str(tmp_path / "shards"))
    written = Counter(u for s in out.shard_ids() for u in out.metadata(s, ["uid"]).column("uid").to_pylist())
    assert written == copies


def test_weight_only_as_the_last_top_level_step(tmp_path: Path) -> None:
    weight = "{weight: {by: score_quantile, model_id: m, bins: [0.5], counts: [2, 1]}}"
    for steps, path in (
        (f"  - {weight}\n  - no_filter\n", "1"),
        (f"  - all: [{weight}, no_filter]\n", "1.1"),
        (f"  - no_filter\n  - seq: [{weight}]\n", "2.1"),
    ):
        with pytest.raises(RecipeError, match=rf"step {path} \(weight\): .*last top-level step"):
            load_recipe(recipe_file(tmp_path, f"steps:\n{steps}"))
    for params, message in (
        ("{by: score_quantile, model_id: m, bins: [0.5], counts: [2]}", "one more value"),
        ("{by: balance, model_id: m, entries: [cat]}", "parameter model_id is for by: score_quantile, not by: bal"),
        ("{by: balance, entries: [cat], scores: embeddings, count_absent: false}", "scores, count_absent is for"),
        ("{by: score_quantile, model_id: m, bins: [0.5], counts: [2, 1], t: 5, max_copies: 2}", "t, max_copies is"),
        ("{by: score_quantile, model_id: m, bins: [0.5], counts: [2, 1], entries: [cat]}", "for by: balance, not"),
        ("{by: score_quantile, model_id: m, bins: [0.5], counts: [2, 1], match: words}", "match is for by: bal"),
        ("{by: size}", "must be one of"),
    ):
        with pytest.raises(RecipeError, match=message):
            load_recipe(recipe_file(tmp_path, f"steps:\n  - weight: {params}\n"))


def test_bool_recipes_keep_their_subset_json(tmp_path: Path) -> None:
    pool = text_pool(tmp_path / "pool", caption_rows(50, 8), per_shard=20)
    uids, info = apply(pool, tmp_path, "steps:\n  - caption_quality\n")
    assert "copies" not in info and "num_unique_uids" not in info
    assert info["num_uids"] == len(uids) == len(set(uids))


def test_shipped_recipes() -> None:
    (balance,) = [n.filter for n in load_recipe("balance_suite", {"suite": "tiny", "t": "500"}).leaves()]
    assert (balance.entries, balance.t, balance.match, balance.unmatched) == ("suite:tiny", 500, "words", "drop")
    (quality,) = [n.filter for n in load_recipe("caption_quality", {"max_repeated_words": "1"}).leaves()]
    assert (quality.max_repeated_words, quality.max_repeated_ngrams, quality.boilerplate) == (1, 0.3, True)
    clip, weight = [n.filter for n in load_recipe("weight_clip_score").leaves()]
    assert (clip.fraction, weight.by, weight.bins, weight.counts) == (0.3, "score_quantile", [0.1, 0.2], [3, 2, 1])
