import json

import pytest
from conftest import byte_tokenizer

from compressor.data import calibration_windows, eval_windows, load_documents, wikileads_articles
from compressor.errors import CompressorError


def test_wikileads_split_per_protocol():
    articles = wikileads_articles()
    assert len(articles) == 10_033
    evals, calib = load_documents("bundled:wikileads", "eval"), load_documents("bundled:wikileads", "calibration")
    assert len(evals) == 1004 and len(calib) == 9029
    assert evals[0] == articles[0] and evals[1] == articles[10] and calib[0] == articles[1]


def test_calibration_windows_are_seeded_and_start_with_bos(corpus):
    tok = byte_tokenizer()
    docs = load_documents(str(corpus), "calibration")
    a = calibration_windows(tok, docs, samples=5, seqlen=48, seed=0)
    b = calibration_windows(tok, docs, samples=5, seqlen=48, seed=0)
    c = calibration_windows(tok, docs, samples=5, seqlen=48, seed=1)
    assert a.shape == (5, 48) and (a[:, 0] == tok.bos_token_id).all()
    assert a.equal(b) and not a.equal(c)
    text = tok.decode(a[0, 1:])
    assert text in "\n\n".join(docs)  # a contiguous stretch of the corpus


def test_eval_windows_with_and_without_bos():
    tok = byte_tokenizer()
    text = "abcdefghij" * 10  # 100 byte tokens
    w = eval_windows(tok, text, seqlen=8)
    assert w.shape == (100 // 7, 8) and (w[:, 0] == tok.bos_token_id).all()
    assert tok.decode(w[1, 1:]) == text[7:14]
    tok.bos_token = None
    w = eval_windows(tok, text, seqlen=8)
    assert w.shape == (12, 8) and tok.decode(w[1]) == text[8:16]


def test_jsonl_and_saved_dataset_sources(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"doc {i}"}) for i in range(3)))
    assert load_documents(str(path), "calibration", text_field="body") == ["doc 0", "doc 1", "doc 2"]
    with pytest.raises(CompressorError, match="text_field"):
        load_documents(str(path), "calibration", text_field="text")
    import datasets

    datasets.Dataset.from_dict({"text": ["one", "two"]}).save_to_disk(str(tmp_path / "ds"))
    assert load_documents(str(tmp_path / "ds"), "calibration") == ["one", "two"]


def test_empty_and_missing_sources_are_clear(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(CompressorError, match="holds no text"):
        load_documents(str(tmp_path / "empty.txt"), "calibration")
    with pytest.raises(CompressorError, match="not found"):
        load_documents(str(tmp_path / "nope.txt"), "calibration")
    with pytest.raises(CompressorError, match="fewer than one window"):
        calibration_windows(byte_tokenizer(), ["tiny"], samples=1, seqlen=64)
