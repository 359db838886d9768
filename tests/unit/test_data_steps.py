"""The data pipeline's document steps and MinHash dedup, without Spark (llmops_provider/data/steps.py, minhash.py)."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from llmops_provider.data import minhash
from llmops_provider.data import steps as st
from llmops_provider.recipes import (
    C4Spec,
    DataSpec,
    FineWebSpec,
    GopherQualitySpec,
    GopherRepetitionSpec,
    RecipeError,
    load_recipe,
)

pytestmark = pytest.mark.unit

ENGLISH = (
    "The scheduler reads every DAG file and creates the runs that are due. Each task of a run is sent to "
    "the executor, which starts it in a worker process and reports the state back to the database. When a "
    "task fails it is retried with a delay, and the number of retries is part of the task's arguments. The "
    "web server shows the state of every run and lets the operator clear a task so that it runs again."
)


def _data(**over) -> DataSpec:
    return DataSpec(sources=[{"path": "/tmp/x"}], **over)


def _doc(text: str) -> st.Doc:
    return st.Doc("d", text, "src")


# -- parse: malformed lines are quarantined with a reason ---------------------------------


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"id": "a", "text": "unterminated', "invalid_json"),
        (b'{"id": "a", "text": "caf\xe9"}', "invalid_utf8"),
        (b"[1, 2]", "not_an_object"),
        (b'{"id": "a", "body": "x"}', "missing_text"),
        (b'{"id": "a", "text": null}', "missing_text"),
        (b'{"id": "a", "text": 42}', "text_not_string"),
        (b'{"id": ["a"], "text": "x"}', "bad_id"),
        (b'{"id": true, "text": "x"}', "bad_id"),
        (json.dumps({"id": "big", "text": "x" * 200}).encode(), "record_too_large"),
        (b'{"id": "a", "text": "lone \\ud800 surrogate"}', "invalid_unicode"),
        (b'{"id": "\\udfff", "text": "x"}', "invalid_unicode"),
    ],
)
def test_parse_quarantines_each_malformed_category(raw, reason):
    doc, got = st.parse_line(raw, "src", "text", "id", max_bytes=100)
    assert doc is None and got == reason and reason in st.PARSE_REASONS


def test_parse_keeps_ids_and_derives_a_stable_one_when_missing():
    doc, reason = st.parse_line(b'{"id": 7, "text": "hello"}', "src", "text", "id", 100)
    assert reason is None and doc.id == "7" and doc.text == "hello"
    doc, reason = st.parse_line(b'{"id": "e", "text": "pair \\ud83d\\ude00 and \\u00e9"}', "src", "text", "id", 100)
    assert reason is None and doc.text == "pair \U0001f600 and \u00e9"  # escaped pairs are characters
    doc, _ = st.parse_line(b'{"text": "hello"}', "src", "text", "id", 100)
    st.assign_id(doc)
    assert doc.id == f"doc-{st.content_hash('hello')[:16]}"


# -- transforms --------------------------------------------------------------------------


def test_normalize_nfc_controls_and_whitespace():
    raw = " Cafe\u0301   with\ttabs\u0000 and   spaces  \r\n  second   line \x07 \n\n\n\nthird "
    assert st.normalize(raw) == "Caf\u00e9 with tabs and spaces\nsecond line\n\nthird"


def test_pii_redaction_of_each_kind():
    text = (
        "Mail jane.doe@example.com or call +1 415-555-0132 from 192.168.10.7 (not 1.2.3.999 or v1.2.3). "
        "token = 'abcdEFGH1234ijklMNOP' AKIAABCDEFGHIJKLMNOP ghp_"
        + "a" * 36
        + " at 2001:0db8:0000:0000:0000:ff00:0042:8329"
    )
    doc = _doc(text)
    st.RedactPII(["email", "ip", "phone", "key"])(doc)
    assert "<EMAIL>" in doc.text and "jane.doe" not in doc.text
    assert "<PHONE>" in doc.text and "555-0132" not in doc.text
    assert doc.text.count("<IP>") == 2 and "1.2.3.999" in doc.text and "v1.2.3" in doc.text
    assert "token = '<KEY>" in doc.text and "AKIA" not in doc.text and "ghp_" not in doc.text
    only_email = _doc(text)
    st.RedactPII(["email"])(only_email)
    assert "192.168.10.7" in only_email.text and "<EMAIL>" in only_email.text


def _redact_without_hints(text: str, kinds: list[str]) -> str:
    for kind, _, pattern, replacement in st.PII_PATTERNS:
        if kind in kinds:
            text = pattern.sub(replacement, text)
    return text


def test_pii_hints_only_skip_documents_without_a_match():
    """The cheap pre-checks never change what is redacted: same text as every pattern run blindly."""
    kinds = ["email", "ip", "phone", "key"]
    texts = [
        ENGLISH,
        "TOKEN: 'abcdEFGH1234ijklMNOP' and Api-Key=ZYXWVUTSRQPONMLK0123 and passwd = hunter2hunter2hunter2",
        "to\u212aen: abcdefghijklmnopqrst (a Kelvin sign: re's ignore-case reads it as k)",
        "\u017fecret=abcdefghijklmnopqrst (a long s)",
        "token is not followed by a separator here; key = short; secret: x",
        "ring 555 123-4567, fax (030) 1234 5678, +44 20 7946 0958; serial 1234-5678-90",
        "hosts 10.0.0.1, 256.1.1.1 and 1.2.3.4.5; v1.2.3; fe80:0000:0000:0000:0202:b3ff:fe1e:8329 ::1",
        "keys AKIAABCDEFGHIJKLMNOP ghs_" + "b" * 40 + " xoxb-1234567890-abc sk-" + "c" * 24,
        "-----BEGIN RSA PRIVATE KEY-----\nMIIB\n-----END RSA PRIVATE KEY----- mail x.y@example.org",
        "",
    ]
    for text in texts:
        doc = _doc(text)
        st.RedactPII(kinds)(doc)
        assert doc.text == _redact_without_hints(text, kinds), text
    redacted = _doc(texts[2])
    st.RedactPII(["key"])(redacted)
    assert "<KEY>" in redacted.text  # the case-folded hint found the Kelvin-sign "token"


# -- filters: published heuristics with recipe thresholds --------------------------------


def test_gopher_quality_rules():
    rule = st.GopherQuality(GopherQualitySpec(enabled=True))
    assert rule(_doc(ENGLISH)) is None
    assert rule(_doc("too few words here"))[0] == "gopher_below_min_words"
    assert rule(_doc(" ".join(["## ### #### data"] * 30)))[0] in ("gopher_symbol_word_ratio", "gopher_alpha_words")
    assert (
        rule(_doc(" ".join(f"{1000 + i} {20000 + 7 * i} {300000 + 13 * i}" for i in range(40))))[0]
        == "gopher_alpha_words"
    )
    no_stop = " ".join(random.Random(1).choice(["alpha", "beta", "gamma", "delta"]) for _ in range(80))
    assert rule(_doc(no_stop))[0] == "gopher_stop_words"
    assert (
        st.GopherQuality(GopherQualitySpec(enabled=True, min_words=10_000))(_doc(ENGLISH))[0]
        == "gopher_below_min_words"
    )


def test_gopher_repetition_rules():
    rule = st.GopherRepetition(GopherRepetitionSpec())
    assert rule(_doc(ENGLISH)) is None
    assert rule(_doc("\n".join(["buy now, limited offer"] * 10 + [ENGLISH])))[0] == "gopher_dup_lines"
    looped = ENGLISH + " " + " ".join(ENGLISH.split()[:30]) + " " + " ".join(ENGLISH.split()[:30])
    assert rule(_doc(looped))[0].startswith(("gopher_top_", "gopher_dup_"))
    lenient = GopherRepetitionSpec(max_dup_ngram_char_ratio={5: 0.9}, max_top_ngram_char_ratio={2: 0.9})
    assert st.GopherRepetition(lenient)(_doc(looped)) is None


def test_c4_drops_lines_and_documents():
    rule = st.C4(C4Spec(enabled=True, min_sentences=2))
    doc = _doc("A menu line\n" + ENGLISH + "\nPlease read our privacy policy for details.")
    assert rule(doc) is None and doc.text == ENGLISH
    assert rule(_doc(ENGLISH + " lorem ipsum dolor."))[0] == "c4_lorem_ipsum"
    assert rule(_doc(ENGLISH + " f() { return 1; }."))[0] == "c4_curly_bracket"
    assert rule(_doc("One sentence only."))[0] == "c4_too_few_sentences"


def test_fineweb_rules():
    rule = st.FineWeb(FineWebSpec(enabled=True))
    assert rule(_doc(ENGLISH)) is None
    assert rule(_doc("\n".join(f"item {i}" for i in range(30))))[0] == "fineweb_line_punct_ratio"
    assert rule(_doc("\n".join(["a short line."] * 3 + [ENGLISH])))[0] in (
        "fineweb_short_line_ratio",
        "fineweb_dup_line_chars",
    )


def test_blocklist_whole_words_and_threshold(tmp_path):
    terms_file = tmp_path / "terms.txt"
    terms_file.write_text("# toxic terms\nBadword\n")
    spec = _data(blocklist={"terms": ["evil phrase"], "path": str(terms_file), "max_hits": 1}).blocklist
    rule = st.Blocklist(st.blocklist_terms(spec), spec.max_hits)
    assert rule(_doc("a badword once is tolerated")) is None
    assert rule(_doc("badword and an Evil Phrase"))[0] == "blocklisted"
    assert rule(_doc("badwords are other words, badwordy too")) is None
    with pytest.raises(SystemExit, match="data.blocklist.path"):
        st.blocklist_terms(_data(blocklist={"path": str(tmp_path / "missing.txt")}).blocklist)


def test_language_filter_uses_the_shipped_model():
    rule = st.Language(["en"], 0.5, 2000)
    assert rule(_doc(ENGLISH)) is None
    german = "Der Planer liest jede Datei und erzeugt die Läufe, die fällig sind. Jede Aufgabe wird wiederholt."
    reason, detail = rule(_doc(german))
    assert reason == "language_not_allowed" and detail.startswith("de")
    assert st.Language([], 0.5, 2000)(_doc(german)) is None  # [] keeps every language


def test_batch_language_identifier_answers_what_py3langid_answers():
    from py3langid import langid

    from llmops_provider.data import language

    reference = langid.LanguageIdentifier.from_model_file(langid.MODEL_FILE, norm_probs=True)
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    texts = [p for p in readme.split("\n\n") if p.strip()][:150]
    texts += [
        "",
        "   ",
        "ALL CAPS ARE FOLDED BEFORE THE MODEL SEES THEM",
        "Der Planer liest jede Datei und erzeugt die Läufe, die fällig sind.",
        "Le planificateur lit chaque fichier et crée les exécutions prévues.",
        "调度器读取每个文件并创建到期的运行。",
        "Планировщик читает каждый файл и создаёт запуски.",
        "x",
        "12345 67890 !!! ???",
    ]
    # a small group budget forces several groups of different widths
    found = language.model().classify_batch(texts, max_batch_bytes=20_000)
    assert len(found) == len(texts)
    for text, (lang, score) in zip(texts, found, strict=True):
        want_lang, want_score = reference.classify(text)
        assert lang == want_lang, text[:60]
        assert score == want_score, text[:60]  # the same float32 sums in the same order: equal to the bit
    assert {lang for lang, _ in found} >= {"en", "de", "fr", "zh", "ru"}


def test_first_seen_counts_is_a_counter_of_the_walk():
    from collections import Counter

    from llmops_provider.data.language import first_seen_counts

    rng = np.random.default_rng(7)
    for size, high in ((1, 3), (5, 2), (200, 50), (1000, 100_053)):
        feats = rng.integers(0, high, size=size).astype(np.int64)
        values, counts = first_seen_counts(feats)
        want = Counter(feats.tolist())  # what py3langid sums over, in its order
        assert values.tolist() == list(want) and counts.tolist() == list(want.values())


def test_the_cached_language_model_answers_as_the_shipped_one(tmp_path):
    from py3langid import langid

    from llmops_provider.data import language

    fresh = language.BatchIdentifier(langid.LanguageIdentifier.from_model_file(langid.MODEL_FILE, norm_probs=True))
    path = tmp_path / "cache" / "model.npz"
    fresh.save(path)
    cached = language.BatchIdentifier.load(path)
    texts = [ENGLISH, "Der Planer liest jede Datei und erzeugt die Läufe.", "调度器读取每个文件", "", "12345 !!!"]
    assert cached.classify_batch(texts) == fresh.classify_batch(texts)
    assert not list(path.parent.glob(".*.tmp"))  # written through a temporary sibling, renamed into place


def test_run_steps_batch_agrees_with_one_document_at_a_time():
    steps = st.build_steps(_data(min_chars=40))
    german = "Der Planer liest jede Datei und erzeugt die Läufe, die fällig sind. Jede Aufgabe wird wiederholt."
    texts = [ENGLISH, "short", german, ENGLISH + " Mail alice@example.com now.", "\n\n".join([ENGLISH] * 6)]
    one = [(st.run_steps(d := _doc(t), steps), d.text, d.modified) for t in texts]
    docs = [_doc(t) for t in texts]
    batch = st.run_steps_batch(docs, steps)
    assert [(b, d.text, d.modified) for b, d in zip(batch, docs, strict=True)] == one
    assert [r[0] if r else None for r, _, _ in one] == [None, "length", "language", None, "gopher_repetition"]


def test_run_steps_reports_first_drop_and_modifying_steps():
    steps = st.build_steps(_data(min_chars=40))
    assert [s.name for s in steps] == ["normalize", "length", "language", "gopher_repetition", "pii"]
    doc = _doc("  " + ENGLISH + " Write to ops@example.com.  ")
    assert st.run_steps(doc, steps) is None and doc.modified == ["normalize", "pii"]
    assert st.run_steps(_doc("short"), steps) == ("length", "text_too_short", "5 < 40 chars")
    names = st.step_names(steps, _data())
    assert names[0] == "parse" and names[-3:] == ["exact_dedup", "near_dedup", "ids"]


def test_recipe_rejects_bands_rows_mismatch(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "name: bad-bands\ndata:\n  sources: [{path: /x}]\n  near_dedup: {num_perm: 100, bands: 9, rows: 10}\n"
    )
    with pytest.raises(RecipeError, match=r"near_dedup.*bands x near_dedup.rows \(9 x 10\) must equal"):
        load_recipe(path)


# -- MinHash LSH ---------------------------------------------------------------------------


def _mutate(text: str, k: int, seed: int) -> str:
    rng = random.Random(seed)
    words = text.split()
    for i in rng.sample(range(len(words)), k):
        words[i] = f"zz{rng.randrange(10**6)}"
    return " ".join(words)


def test_word_hashes_are_case_and_punctuation_insensitive_and_stable():
    a = minhash.word_hashes("Hello, World! hello")
    assert a.dtype == np.uint32 and a.size == 3 and a[0] == a[2]
    assert (minhash.word_hashes("hello world hello") == a).all()
    # fixed values: a change of the hash function changes every dataset version, so it must be deliberate
    assert minhash.word_hashes("airflow").tolist() == minhash.word_hashes("AIRFLOW").tolist()
    assert minhash.shingles("one two three", 5).size == 1  # shorter than a shingle: one shingle


def test_exact_jaccard_and_signature_estimate():
    base = ENGLISH * 3
    hasher = minhash.MinHasher(100, 20, 5, seed=42)
    for k in (2, 10, 30):
        copy = _mutate(base, k, seed=k)
        a, b = minhash.shingles(base, 5), minhash.shingles(copy, 5)
        true = minhash.jaccard(a, b)
        sig = hasher.signatures([a, b])
        assert abs((sig[0] == sig[1]).mean() - true) < 0.2, (k, true)
    assert minhash.jaccard(a, a) == 1.0
    keys = hasher.band_keys(hasher.signatures([a, a.copy(), minhash.shingles("unrelated text entirely " * 9, 5)]))
    assert keys.shape == (3, 20) and (keys[0] == keys[1]).all() and not (keys[0] == keys[2]).any()
    with pytest.raises(ValueError, match="bands x rows"):
        minhash.MinHasher(100, 9, 10)


def test_bucket_pairs_are_capped_but_stay_connected():
    assert minhash.candidate_pairs([3, 1, 2]) == [(1, 2), (1, 3), (2, 3)]
    pairs = minhash.candidate_pairs(list(range(100)), max_pairs_bucket=2)
    assert len(pairs) == 2 * 100 - 3 and all(b - a <= 2 for a, b in pairs)


def test_lsh_components_are_the_connected_components_labelled_by_their_smallest_id():
    # 10-20-30 is a chain given out of order, 7-8 a pair, 40 links to 30 through a long id
    ids, labels = minhash.components(np.array([30, 8, 20, 1 << 60]), np.array([20, 7, 10, 30]))
    assert dict(zip(ids.tolist(), labels.tolist(), strict=True)) == {
        7: 7,
        8: 7,
        10: 10,
        20: 10,
        30: 10,
        1 << 60: 10,
    }


def test_jaccard_and_sorted_unique_match_python_sets():
    rng = np.random.default_rng(11)
    top = np.uint32(0xFFFFFFFF)
    cases = [(np.array([], np.uint32), np.array([], np.uint32)), (np.array([], np.uint32), np.array([1], np.uint32))]
    for _ in range(200):
        pool = rng.integers(0, 1 << 32, size=rng.integers(1, 60), dtype=np.uint64).astype(np.uint32)
        pool = np.append(pool, top)  # the largest hash sits past every other value
        a = rng.choice(pool, size=rng.integers(0, 40))
        b = rng.choice(pool, size=rng.integers(0, 40))
        cases.append((a, b))
    for a, b in cases:
        sa, sb = minhash.sorted_unique(a), minhash.sorted_unique(b)
        assert sa.tolist() == np.unique(a).tolist() and sb.tolist() == np.unique(b).tolist()
        values, counts = minhash.sorted_counts(a)
        want_values, want_counts = np.unique(a, return_counts=True)
        assert values.tolist() == want_values.tolist() and counts.tolist() == want_counts.tolist()
        union = set(a.tolist()) | set(b.tolist())
        want = len(set(a.tolist()) & set(b.tolist())) / len(union) if union else 1.0
        assert minhash.jaccard(sa, sb) == pytest.approx(want)


def test_top_repeat_is_the_most_frequent_value_and_its_first_position():
    rng = np.random.default_rng(5)
    cases = [np.array([], np.uint32), np.array([7], np.uint32), np.array([3, 1, 2], np.uint32)]
    for _ in range(300):
        pool = rng.integers(0, 1 << 32, size=rng.integers(1, 30), dtype=np.uint64).astype(np.uint32)
        cases.append(rng.choice(np.append(pool, np.uint32(0xFFFFFFFF)), size=rng.integers(1, 80)))
    for grams in cases:
        values = grams.tolist()
        tally = Counter(values)
        want_count = max(tally.values(), default=0)
        count, first = minhash.top_repeat(grams)
        assert count == want_count
        if want_count < 2:
            assert first == -1
        else:  # ties: the smallest value, as repeats() and np.unique order them
            winner = min(v for v, c in tally.items() if c == want_count)
            assert first == values.index(winner)
            starts, lengths, positions = minhash.repeats(grams)
            top = int(np.argmax(lengths))
            assert (count, first) == (int(lengths[top]), int(positions[starts[top]]))


def _buckets(bands: np.ndarray, rids: np.ndarray) -> list[list[int]]:
    """The LSH buckets the plain way: the rids sharing a key, band by band (reference for the vectorized code)."""
    out = []
    for band in range(bands.shape[1]):
        buckets: dict[int, list[int]] = {}
        for i in range(bands.shape[0]):
            buckets.setdefault(int(bands[i, band]), []).append(int(rids[i]))
        out.extend(buckets.values())
    return out


def test_bucket_links_link_every_bucket_member_to_its_smallest_rid():
    rng = np.random.default_rng(5)
    n, n_bands = 300, 4
    rids = rng.choice(1 << 40, n, replace=False).astype(np.int64)
    bands = rng.integers(-30, 30, size=(n, n_bands), dtype=np.int64)
    want = {(m, min(members)) for members in _buckets(bands, rids) for m in members if m != min(members)}
    a, b = minhash.bucket_links(rids, bands)
    got = list(zip(a.tolist(), b.tolist(), strict=True))
    assert set(got) == want and len(got) == len(want)
    assert minhash.bucket_links(rids[:0], bands[:0])[0].size == 0


def test_bucket_pairs_lists_what_candidate_pairs_lists_per_bucket():
    rng = np.random.default_rng(3)
    n, n_bands = 400, 6
    rids = rng.permutation(10_000)[:n].astype(np.int64) * 7919  # arbitrary order, not positions
    bands = rng.integers(0, 40, size=(n, n_bands), dtype=np.int64)  # small key range: big buckets
    bands[:150, 0] = 12345  # a template bucket larger than max_pairs_bucket
    pos = {int(r): i for i, r in enumerate(rids)}
    want = {pair for members in _buckets(bands, rids) for pair in minhash.candidate_pairs(members, 16)}
    got = minhash.bucket_pairs(bands, rids, 16)
    pairs = [(int(rids[i]), int(rids[j])) for i, j in got.tolist()]
    assert pairs == sorted(want) and len(pairs) == len(set(pairs))
    assert {(pos[a], pos[b]) for a, b in want} == {tuple(p) for p in got.tolist()}
    assert minhash.bucket_pairs(bands[:1], rids[:1], 16).shape == (0, 2)


def test_component_edges_prefilter_by_estimate_loses_no_true_pair():
    base = ENGLISH * 3
    texts = [base] + [_mutate(base, k, seed=k) for k in (1, 2, 3, 40, 60)] + ["unrelated words " * 40]
    hasher = minhash.MinHasher(100, 20, 5, seed=42)
    sets = [minhash.shingles(t, 5) for t in texts]
    sigs = hasher.signatures(sets)
    bands = [np.zeros(20, dtype=np.int64).tolist() for _ in texts]  # one bucket: every pair is a candidate
    rids = [11, 12, 13, 14, 15, 16, 17]
    exact, n_pairs, n_checked = minhash.component_edges(rids, sets, sigs, bands, 0.8, 64, min_estimate=0.0)
    assert n_pairs == n_checked == 21
    truth = {(rids[i], rids[j]) for i in range(7) for j in range(i + 1, 7) if minhash.jaccard(sets[i], sets[j]) >= 0.8}
    assert {(a, b) for a, b, _ in exact} == truth and len(truth) >= 3
    fast, n_pairs, n_checked = minhash.component_edges(rids, sets, sigs, bands, 0.8, 64, min_estimate=0.65)
    assert fast == exact and n_checked < n_pairs, "the estimate skips dissimilar pairs, never a true one"


def test_a_chain_of_near_copies_keeps_one_document_deterministically():
    # a-b-c-d is a chain (a and d are not similar), e-f a separate pair
    edges = [(1, 2), (2, 3), (3, 4), (5, 6)]
    rank = {i: (f"id-{i}",) for i in range(1, 7)}
    removed = minhash.clusters(edges, rank)
    kept = {1, 2, 3, 4, 5, 6} - set(removed)
    assert kept == {2, 5}, "the most connected member (then the smallest id) is kept, one per cluster"
    assert removed == {1: 2, 3: 2, 4: 2, 6: 5}
    assert minhash.clusters(list(reversed(edges)), rank) == removed


def test_exclusion_record_reasons_are_machine_readable():
    # every drop reason is a snake_case token: dashboards group by it
    steps = st.build_steps(
        _data(quality={"gopher_quality": {"enabled": True}, "c4": {"enabled": True}, "fineweb": {"enabled": True}})
    )
    samples = ["x", ENGLISH, "\n".join(["same line"] * 20), "## " * 100, ENGLISH + " {"]
    for text in samples:
        dropped = st.run_steps(_doc(text), steps)
        if dropped:
            assert re.fullmatch(r"[a-z0-9_]+", dropped[1]), dropped


def test_output_lines_from_texts_on_disk_are_the_json_of_the_records(tmp_path):
    # local masters leave each text on disk as its JSON string and write the lines from there:
    # the bytes must be json.dumps of the record, as when the text travels in the row
    import pyarrow as pa

    from llmops_provider.data.prepare_corpus import TEXT_AT, TextReader, TextWriter, _json_lines

    cols = ("file", "id", "text", "line", "step", "reason", "detail", "source")
    rows = [
        ("train", "a-1", "plain", None, None, None, None, "file:/in/a.jsonl"),
        ("excluded", "é-2", 'quote " backslash \\ newline \n tab \t', None, "language", "not_english", None, "s"),
        ("excluded", "3", "x", None, "near_dedup", "near_duplicate", "duplicate of a-1", "s"),
        ("test", "4", "café ☃ \U0001f600 \u2028 \x7f \x00", None, None, None, None, "s"),
        ("validation", "5", "", None, None, None, None, "s"),
        ("quarantine", None, None, '{"id": "broken', "parse", "invalid_json", None, "file:/in/b.jsonl"),
        (None, None, None, None, None, None, None, "s"),  # a blank line: no output
    ]
    expected = []
    for r in map(lambda v: dict(zip(cols, v, strict=True)), rows):
        if r["file"] is None:
            expected.append(b"")
            continue
        if r["file"] == "quarantine":
            rec = {k: r[k] for k in ("line", "reason", "source")}
        elif r["file"] == "excluded":
            rec = {k: r[k] for k in ("id", "step", "reason", "detail", "source", "text")}
        else:
            rec = {"id": r["id"], "text": r["text"]}
        expected.append((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))

    writer = TextWriter(str(tmp_path))
    located = [writer.add(v[2]) if v[2] is not None else (None, None, None) for v in rows]
    writer.close()
    in_rows = pa.RecordBatch.from_pylist([dict(zip(cols, v, strict=True)) for v in rows])
    on_disk = pa.RecordBatch.from_pylist(
        [{**dict(zip(cols, v, strict=True)), "text": None, **dict(zip(TEXT_AT, at, strict=True))}
         for v, at in zip(rows, located, strict=True)]
    )  # fmt: skip
    assert _json_lines(in_rows) == expected
    with TextReader() as reader:
        assert _json_lines(on_disk, reader) == expected
        assert [reader.text(*at) for at in located if at[0]] == [v[2] for v in rows if v[2] is not None]
        part, offset, size = located[0]
        with pytest.raises(RuntimeError, match="bytes expected"):
            reader.json(part, offset + 10**6, size)
