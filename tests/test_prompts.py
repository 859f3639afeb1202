"""Prompt files: every format, ids, errors, and every real corpus in ../shared/data/prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from routet2i._errors import UsageError
from routet2i.training.prompts import load_prompt_records, load_prompts, prompt_id

EXPECTED = ["a red cat", "two dogs, one ball", 'a "quoted" sign']


@pytest.mark.parametrize("fmt", ["txt", "csv", "tsv", "jsonl", "json", "json-dict", "jsonl-str"])
def test_formats(tmp_path: Path, fmt: str) -> None:
    if fmt == "txt":
        p = tmp_path / "p.txt"
        p.write_text("a red cat\n\n  two dogs, one ball \na red cat\n" + 'a "quoted" sign\n')
    elif fmt in ("csv", "tsv"):
        import csv

        p = tmp_path / f"p.{fmt}"
        with open(p, "w", newline="") as f:
            w = csv.writer(f, delimiter="\t" if fmt == "tsv" else ",")
            w.writerow(["id", "Prompt", "category"])
            for i, t in enumerate(EXPECTED + ["", EXPECTED[0]]):
                w.writerow([i, t, "x"])
    elif fmt == "jsonl":
        p = tmp_path / "p.jsonl"
        p.write_text("\n".join(json.dumps({"caption": t, "k": 1}) for t in EXPECTED) + "\n\n")
    elif fmt == "jsonl-str":
        p = tmp_path / "p.jsonl"
        p.write_text("\n".join(json.dumps(t) for t in EXPECTED))
    elif fmt == "json":
        p = tmp_path / "p.json"
        p.write_text(json.dumps([{"text": t, "image": "x"} for t in EXPECTED]))
    else:
        p = tmp_path / "p.json"
        p.write_text(json.dumps({f"id{i}": {"prompt": t} for i, t in enumerate(EXPECTED)}))
    assert load_prompts(p) == EXPECTED


def test_ids_are_stable_hashes_or_a_column(tmp_path: Path) -> None:
    p = tmp_path / "p.csv"
    p.write_text("key,prompt\nk1,a cat\nk2,a dog\n")
    recs = load_prompt_records(p)
    assert [r.prompt_id for r in recs] == [prompt_id("a cat"), prompt_id("a dog")]
    assert recs[0].prompt_id.startswith("p") and len(recs[0].prompt_id) == 13
    assert [r.prompt_id for r in load_prompt_records(p, id_column="key")] == ["k1", "k2"]


def test_named_column(tmp_path: Path) -> None:
    p = tmp_path / "p.csv"
    p.write_text("prompt,short\nlong text one,one\nlong text two,two\n")
    assert load_prompts(p, column="short") == ["one", "two"]


@pytest.mark.parametrize(
    ("name", "text", "kwargs", "needle"),
    [
        ("p.csv", "a,b\n1,2\n", {}, "has no prompt column"),
        ("p.csv", "prompt\nx\n", {"column": "nope"}, "--column 'nope' is not in"),
        ("p.csv", "", {}, "is empty"),
        ("p.json", "{not json", {}, "is not JSON"),
        ("p.json", "[1, 2]", {}, "entry 1 is a int"),
        ("p.jsonl", '{"prompt": "a"}\nnope\n', {}, "line 2 is not JSON"),
        ("p.txt", "\n\n", {}, "holds no prompt"),
        ("p.xlsx", "x", {}, "unknown format .xlsx"),
        ("p.csv", "id,prompt\n1,a\n1,b\n", {"id_column": "id"}, "id '1' is used by two"),
    ],
)
def test_errors(tmp_path: Path, name: str, text: str, kwargs: dict, needle: str) -> None:
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(UsageError) as info:
        load_prompt_records(p, **kwargs)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        load_prompts(tmp_path / "absent.txt")


# At least this many distinct prompts in each corpus of ../shared/data/prompts (README numbers, minus repeats).
CORPORA = {
    "parti/PartiPrompts.tsv": 1600,
    "dpg_bench/dpg_bench_prompts.csv": 1065,
    "tifa_v1/tifa_v1.0_text_inputs.json": 4000,
    "diffusiondb_imagereward/refl_data.json": 9000,
    "gecko/prompts.csv": 1500,
}


def test_every_corpus_loads(prompts_dir: Path) -> None:
    files = [
        f
        for f in sorted(prompts_dir.rglob("*"))
        if f.suffix.lower() in (".txt", ".csv", ".tsv", ".json", ".jsonl") and f.stem.lower() != "license"
    ]
    assert len(files) >= len(CORPORA) + 8
    for f in files:
        recs = load_prompt_records(f)
        assert recs and all(r.prompt and r.prompt == r.prompt.strip() for r in recs), f
        assert len({r.prompt_id for r in recs}) == len(recs), f
        rel = str(f.relative_to(prompts_dir))
        if rel in CORPORA:
            assert len(recs) >= CORPORA[rel], rel
    compbench = [f for f in files if "t2i_compbench" in str(f)]
    assert sum(len(load_prompts(f)) for f in compbench) > 8000
