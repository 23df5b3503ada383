"""docs/api.md's examples, run in order in an empty folder: the page shows what the API does."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "api.md"


def code_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


def test_the_page_has_an_example_of_each_part_of_the_api():
    text = "\n".join(code_blocks(PAGE))
    for call in ("api.train(", "api.load(", "api.predict(", "api.evaluate(", "api.open_store(", "api.generate("):
        assert call in text, call


@pytest.mark.slow
def test_the_pages_examples_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in code_blocks(PAGE):
        exec(compile(block, str(PAGE), "exec"), namespace)  # noqa: S102 - our own documentation's code
    # Nothing is written but what the examples asked for.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["more_shards", "my_models", "my_report", "shards"]
    assert (tmp_path / "my_report" / "results.json").is_file()
    prediction = namespace["first"]
    assert prediction.memory_attention.shape == (3, 3)
    assert prediction.decoder_attention.shape[1] == 3
    assert prediction.decoder_attention.shape[0] == len(prediction.output.split()) + 1 or \
        prediction.decoder_attention.shape[0] == namespace["model"].max_length
