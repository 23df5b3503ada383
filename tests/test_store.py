"""The episode store: layout, byte-exact regeneration, atomic writes, re-runs, verify, dataset cards, publish."""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

import pipeline.store as store_module
from pipeline.errors import UserError
from pipeline.manifest import GENERATOR_VERSION
from pipeline.publish import publish
from pipeline.records import RECORD_FIELDS, record_problems
from pipeline.samplers import EPISODE_TYPES, get_sampler
from pipeline.shardio import TAR_HEADER, read_shard, write_shard
from pipeline.store import GenerateConfig, generate, load_manifest, manifest_sha256, shard_paths, verify_store

ROOT = Path(__file__).parents[1]
TYPE = "scan_prim_augmentation"


def config(tmp_path: Path, **overrides) -> GenerateConfig:
    args = {"episode_type": TYPE, "num_episodes": 25, "num_val_episodes": 5, "shard_size": 10, "workers": 1,
            "out": str(tmp_path / "shards"), "progress": False}
    return GenerateConfig(**{**args, **overrides})


def file_bytes(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(store.iterdir())}


def records(path: Path) -> list[tuple[str, dict]]:
    return [(name, json.loads(data)) for name, data in read_shard(path)]


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> Path:
    """A store with a short last train shard and two val shards; tests must not modify it."""
    tmp = tmp_path_factory.mktemp("small")
    return generate(config(tmp, num_val_episodes=12, workers=2))


# --- layout and records ---------------------------------------------------------------------------------

def test_layout_manifest_and_records(small_store):
    assert sorted(p.name for p in small_store.iterdir()) == [
        "README.md", "manifest.json", "train-000000.tar", "train-000001.tar", "train-000002.tar",
        "val-000000.tar", "val-000001.tar"]
    manifest = load_manifest(small_store)
    assert manifest["counts"] == {"train": 25, "val": 12}
    assert [(s["name"], s["count"]) for s in manifest["shards"]] == [
        ("train-000000.tar", 10), ("train-000001.tar", 10), ("train-000002.tar", 5),
        ("val-000000.tar", 10), ("val-000001.tar", 2)]
    assert manifest["generator_version"] == GENERATOR_VERSION
    assert manifest["params"] == {"episode_type": TYPE, "seed": 0, "num_episodes": 25, "num_val_episodes": 12,
                                  "shard_size": 10, "sampler": get_sampler(TYPE).params}
    assert manifest["input_vocab"][:3] == ["<pad>", "<sos>", "<eos>"]
    assert manifest["output_vocab"][3:] == list(get_sampler(TYPE).output_symbols)
    assert verify_store(small_store) == []


def test_records_keys_and_hashes(small_store):
    manifest = load_manifest(small_store)
    for split, count in (("train", 25), ("val", 12)):
        members = [m for path in shard_paths(small_store, split) for m in records(path)]
        assert [name for name, _ in members] == [f"{split}-{i:08d}.json" for i in range(count)]
        for i, (_, record) in enumerate(members):
            assert sorted(record) == sorted(RECORD_FIELDS)
            assert (record["episode_type"], record["split"], record["index"]) == (TYPE, split, i)
    for entry in manifest["shards"]:
        assert hashlib.sha256((small_store / entry["name"]).read_bytes()).hexdigest() == entry["sha256"]
    assert manifest_sha256(small_store) == hashlib.sha256((small_store / "manifest.json").read_bytes()).hexdigest()
    assert shard_paths(small_store, "validation") == shard_paths(small_store, "val")


def test_record_json_is_sorted_and_validation_identifiers_stay_out_of_training(small_store):
    _, data = next(read_shard(small_store / "train-000000.tar"))
    assert data == json.dumps(json.loads(data), sort_keys=True).encode()
    val = {r["identifier"] for p in shard_paths(small_store, "val") for _, r in records(p)}
    assert val == {"jump -> I_JUMP"}  # validation uses the true meanings
    assert all(r["identifier"] not in val for p in shard_paths(small_store, "train") for _, r in records(p))


OLD_TARFILE = tarfile.TarInfo("x").tobuf(tarfile.USTAR_FORMAT)[329:345] != bytes(16)


@pytest.mark.skipif(OLD_TARFILE, reason="this Python's tarfile writes device numbers for regular files "
                    "(fixed in later patch releases); the store's pinned bytes do not follow it")
def test_shards_are_the_bytes_of_webdataset_tarwriter(tmp_path):
    import webdataset as wds
    samples = [(f"train-{i:08d}", os.urandom(n)) for i, n in enumerate([0, 1, 511, 512, 513, 9000] * 4)]
    buffer = io.BytesIO()
    with wds.TarWriter(buffer, encoder=False, **TAR_HEADER) as writer:
        for key, data in samples:
            writer.write({"__key__": key, "json": data})
    count, sha256 = write_shard(tmp_path / "x.tar", samples)
    assert (tmp_path / "x.tar").read_bytes() == buffer.getvalue()
    assert (count, sha256) == (len(samples), hashlib.sha256(buffer.getvalue()).hexdigest())


def test_webdataset_reads_a_store(small_store):
    import webdataset as wds
    urls = [str(p) for p in shard_paths(small_store, "train")]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == [f"train-{i:08d}" for i in range(25)]
    assert samples[3]["json"]["index"] == 3


# --- determinism ----------------------------------------------------------------------------------------

def readme_snippet(heading: str) -> str:
    """The first ```python block after `heading` in the README, as a reader would copy it."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    after = text[text.index(heading):]
    return after[after.index("```python\n") + len("```python\n"):after.index("\n```", after.index("```python"))]


def test_readme_webdataset_snippet_as_written_on_a_two_shard_store(tmp_path, monkeypatch):
    generate(config(tmp_path, episode_type="ME", num_episodes=7, shard_size=4))  # train-000000, train-000001
    monkeypatch.chdir(tmp_path)  # the snippet's paths are relative: shards/ME/...
    namespace: dict = {}
    exec(readme_snippet("### Streaming it with webdataset"), namespace)
    assert len(namespace["shards"]) == 2
    assert namespace["record"] == records(tmp_path / "shards" / "ME" / "train-000001.tar")[-1][1]
    assert namespace["record"]["index"] == 6  # the last of the 7 training episodes: every shard was read


def test_same_arguments_same_bytes_whatever_the_workers(tmp_path, small_store):
    one = generate(config(tmp_path / "one", num_val_episodes=12, workers=1))
    assert file_bytes(one) == file_bytes(small_store)  # small_store was written by 2 workers


def test_other_seed_other_bytes_and_shards_depend_only_on_their_index(tmp_path, small_store):
    other = file_bytes(generate(config(tmp_path / "seed", num_val_episodes=12, seed=1)))
    same = file_bytes(small_store)
    assert all(other[name] != same[name] for name in same if name.endswith(".tar"))
    longer = file_bytes(generate(config(tmp_path / "longer", num_val_episodes=12, num_episodes=40)))
    assert [longer[f"train-00000{i}.tar"] == same[f"train-00000{i}.tar"] for i in range(3)] == [True, True, False]


# --- atomicity ------------------------------------------------------------------------------------------

def assert_only_whole_shards(store: Path, shard_size: int) -> None:
    """No manifest, and every train shard under a final name is complete (all of them are full here)."""
    assert not (store / "manifest.json").exists()
    for path in store.glob("train-*.tar"):
        assert len(records(path)) == shard_size, path.name


@pytest.mark.parametrize("workers", [1, 2])
def test_failure_mid_shard_leaves_no_partial_file_and_rerun_completes(tmp_path, monkeypatch, workers):
    if workers > 1 and multiprocessing.get_start_method() != "fork":
        pytest.skip("the failure is injected by monkeypatching, which only forked workers inherit")
    real_encode = store_module.encode_record

    def failing_encode(record):
        if record["split"] == "train" and record["index"] == 15:  # in the middle of the second train shard
            raise OSError(28, "No space left on device")
        return real_encode(record)

    monkeypatch.setattr(store_module, "encode_record", failing_encode)
    with pytest.raises(UserError, match="No space left on device") as info:
        generate(config(tmp_path, workers=workers, num_episodes=30))  # 3 full shards
    assert "\n" not in str(info.value)
    store = tmp_path / "shards" / TYPE
    assert not store.exists()  # the store appears only once complete
    assert sorted(p.name for p in store.parent.iterdir()) == [f".{TYPE}.lock"]  # no unfinished build outlives the error
    monkeypatch.setattr(store_module, "encode_record", real_encode)
    generate(config(tmp_path))  # no manifest, so no --overwrite needed for other parameters
    assert verify_store(store) == []
    assert file_bytes(store) == file_bytes(generate(config(tmp_path / "clean")))


def test_killed_run_is_regenerated_not_trusted(tmp_path):
    out = tmp_path / "shards"
    store = out / TYPE
    command = [sys.executable, str(ROOT / "cli.py"), "generate", "--episode_type", TYPE, "--num_episodes", "1000000",
               "--shard_size", "500", "--workers", "2", "--out", str(out), "--no_progress"]
    proc = subprocess.Popen(command, cwd=tmp_path, start_new_session=True, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not list(out.glob(f".{TYPE}.tmp-*/train-*.tar")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the pool workers die mid-shard too
        proc.wait()
    unfinished = list(out.glob(f".{TYPE}.tmp-*"))
    assert len(unfinished) == 1 and list(unfinished[0].glob("train-*.tar")), "the run never wrote a shard"
    assert not store.exists()  # the unfinished build (SIGKILL leaves it) sits beside, never under the store's name
    assert_only_whole_shards(unfinished[0], 500)
    generate(config(tmp_path))  # the next run removes it and writes the store
    assert verify_store(store) == []
    assert sorted(p.name for p in out.iterdir()) == [f".{TYPE}.lock", TYPE]


def test_interrupted_overwrite_leaves_the_old_store_whole(tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) during `generate --overwrite` with
    other parameters: the complete store it was replacing is still there, byte for byte, and verifies."""
    out = tmp_path / "shards"
    store = generate(config(tmp_path))
    before = file_bytes(store)
    command = [sys.executable, str(ROOT / "cli.py"), "generate", "--episode_type", TYPE, "--num_episodes", "1000000",
               "--shard_size", "500", "--workers", "2", "--out", str(out), "--overwrite", "--no_progress"]
    proc = subprocess.Popen(command, cwd=tmp_path, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(list(out.glob(f".{TYPE}.tmp-*/train-*.tar"))) < 2 and time.monotonic() < deadline \
                and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it was interrupted"
        assert list(out.glob(f".{TYPE}.tmp-*/train-*.tar")), "the run never wrote a shard"
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130 and stderr.strip().splitlines()[-1] == "error: interrupted", stderr
    assert file_bytes(store) == before
    assert load_manifest(store)["params"]["num_episodes"] == 25
    done = subprocess.run([sys.executable, str(ROOT / "cli.py"), "verify", "--store", str(store)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == f"{store}: ok\n", done.stdout + done.stderr
    assert sorted(p.name for p in out.iterdir()) == [f".{TYPE}.lock", TYPE]  # the unfinished build is gone


def test_overwrite_swaps_the_store_whole_and_refuses_a_directory_with_other_files(tmp_path):
    store = generate(config(tmp_path))
    generate(config(tmp_path, num_episodes=12, overwrite=True))
    assert load_manifest(store)["counts"]["train"] == 12 and verify_store(store) == []
    assert sorted(p.name for p in store.parent.iterdir()) == [f".{TYPE}.lock", TYPE]  # no old or unfinished copy
    (store / "notes.txt").write_text("mine")
    before = file_bytes(store)
    with pytest.raises(UserError, match=r"holds files that are not part of an episode store \(notes.txt\)"):
        generate(config(tmp_path, num_episodes=13, overwrite=True))
    assert file_bytes(store) == before


# --- re-runs --------------------------------------------------------------------------------------------

def mtimes(store: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in store.iterdir()}


def test_identical_rerun_writes_nothing(tmp_path, capsys):
    store = generate(config(tmp_path))
    before = mtimes(store)
    time.sleep(0.01)
    assert generate(config(tmp_path, workers=2)) == store  # workers is not a parameter of the data
    assert mtimes(store) == before
    assert "identical, nothing to do" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through read-only permissions")
def test_identical_store_in_a_read_only_place_needs_no_lock(tmp_path, capsys):
    store = generate(config(tmp_path))
    store_module.lock_path(store).unlink(missing_ok=True)
    for path in (store, store.parent):
        path.chmod(0o555)
    try:
        assert generate(config(tmp_path)) == store
        assert "identical, nothing to do" in capsys.readouterr().err
        with pytest.raises(UserError, match="cannot write the store"):
            generate(config(tmp_path, num_episodes=26, overwrite=True))
    finally:
        for path in (store.parent, store):
            path.chmod(0o755)


def test_other_parameters_are_refused_unless_overwrite(tmp_path):
    store = generate(config(tmp_path))
    before = file_bytes(store)
    with pytest.raises(UserError, match=r"num_episodes: 25 -> 12.*--overwrite"):
        generate(config(tmp_path, num_episodes=12))
    assert file_bytes(store) == before
    generate(config(tmp_path, num_episodes=12, overwrite=True))
    assert load_manifest(store)["params"]["num_episodes"] == 12
    assert not (store / "train-000002.tar").exists()  # the old run's extra shard is gone
    assert verify_store(store) == []


def test_damaged_store_with_same_parameters_is_regenerated(tmp_path):
    store = generate(config(tmp_path))
    before = file_bytes(store)
    (store / "train-000001.tar").write_bytes(b"garbage")
    generate(config(tmp_path))
    assert file_bytes(store) == before


def test_unreadable_manifest_is_refused_unless_overwrite(tmp_path):
    store = generate(config(tmp_path))
    (store / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="--overwrite"):
        generate(config(tmp_path))
    generate(config(tmp_path, overwrite=True))
    assert verify_store(store) == []


# --- bad input ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    ({"episode_type": "nope"}, "choose one of: " + ", ".join(EPISODE_TYPES)),
    ({"num_episodes": 0}, "--num_episodes must be a positive integer"),
    ({"num_val_episodes": -1}, "--num_val_episodes must be a positive integer"),
    ({"shard_size": 0}, "--shard_size must be a positive integer"),
    ({"workers": 0}, "--workers must be a positive integer"),
])
def test_bad_config_is_a_user_error(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        generate(config(tmp_path, **overrides))
    assert not (tmp_path / "shards").exists()


def test_unwritable_out_is_a_user_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="cannot write the store"):
        generate(config(tmp_path, out=str(tmp_path / "file" / "shards")))


# --- verify ---------------------------------------------------------------------------------------------

@pytest.fixture
def store_copy(tmp_path, small_store) -> Path:
    copy = tmp_path / "copy"
    copy.mkdir()
    for name, data in file_bytes(small_store).items():
        (copy / name).write_bytes(data)
    return copy


def edit_manifest(store: Path, edit) -> None:
    manifest = load_manifest(store)
    edit(manifest)
    (store / "manifest.json").write_text(json.dumps(manifest))


def damage_truncate(store):
    path = store / "train-000001.tar"
    path.write_bytes(path.read_bytes()[:5000])


def damage_flip(store):
    data = bytearray((store / "train-000001.tar").read_bytes())
    data[700] ^= 0x01  # inside the first record's JSON
    (store / "train-000001.tar").write_bytes(bytes(data))


@pytest.mark.parametrize("damage, expected", [
    (damage_truncate, ["train-000001.tar: sha256", "train-000001.tar: holds", "unreadable tar"]),
    (damage_flip, ["train-000001.tar: sha256 is"]),
    (lambda s: (s / "train-000001.tar").unlink(), ["train-000001.tar: missing"]),
    (lambda s: (s / "train-000009.tar").write_bytes(b""), ["train-000009.tar: shard file not listed"]),
    (lambda s: (s / "README.md").unlink(), ["README.md: missing"]),
    (lambda s: (s / "manifest.json").unlink(), ["no manifest"]),
    (lambda s: edit_manifest(s, lambda m: m["shards"][2].update(count=6)),
     ["train-000002.tar: holds 5 records, the manifest says 6", "counts.train is 25, its shards hold 26"]),
    (lambda s: edit_manifest(s, lambda m: m.pop("output_vocab")), ["field 'output_vocab' missing"]),
    (lambda s: edit_manifest(s, lambda m: m["output_vocab"].remove("I_JUMP")),
     ["val-000000.tar: val-00000000: output tokens not in the output vocabulary: ['I_JUMP']"]),
    (lambda s: edit_manifest(s, lambda m: m.update(episode_type="ME")),
     ["val-000000.tar: val-00000000: episode_type is 'scan_prim_augmentation', expected 'ME'"]),
])
def test_verify_reports_damage_naming_the_file(store_copy, damage, expected):
    damage(store_copy)
    problems = verify_store(store_copy)
    for text in expected:
        assert any(text in p for p in problems), (text, problems)
    assert all("\n" not in p for p in problems)


@pytest.mark.parametrize("name", ["train-000000.tar", "val-000000.tar"])
def test_a_truncated_shard_is_the_only_one_blamed(store_copy, name):
    """The shards after a truncated one are intact: their records keep the keys the manifest implies."""
    path = store_copy / name
    path.write_bytes(path.read_bytes()[:5000])
    problems = verify_store(store_copy)
    assert any("unreadable tar" in p for p in problems), problems
    assert problems and all(p.startswith(f"{name}: ") for p in problems), problems


def rewrite_shard(store: Path, name: str, change) -> None:
    """Replace a shard by one whose records went through `change`, with a manifest that matches it."""
    samples = [(member[:-len(".json")], json.dumps(change(record), sort_keys=True).encode())
               for member, record in records(store / name)]
    count, sha256 = write_shard(store / name, samples)
    edit_manifest(store, lambda m: next(s for s in m["shards"] if s["name"] == name).update(
        count=count, sha256=sha256))


@pytest.mark.parametrize("change, expected", [
    (lambda r: {k: v for k, v in r.items() if k != "query"}, "missing field(s) query"),
    (lambda r: {**r, "support": []}, "support is not a non-empty list"),
    (lambda r: {**r, "mapping": {"jump": "I_JUMP"}}, "mapping is not a list"),
    (lambda r: {**r, "index": r["index"] + 1}, "does not match its key"),
    (lambda r: {**r, "query": [{"input": "jump", "output": ""}]}, "query[0] has an empty or non-string value"),
    (lambda r: {**r, "identifier": "jump -> I_JUMP"}, "training episode has the validation identifier"),
])
def test_verify_checks_every_record(store_copy, change, expected):
    rewrite_shard(store_copy, "train-000002.tar", change)
    problems = verify_store(store_copy)
    assert problems and all(p.startswith("train-000002.tar: train-0000002") for p in problems), problems
    assert expected in problems[0]


def test_record_problems_token_check():
    record = {"episode_type": "ME", "split": "val", "index": 0, "identifier": "x",
              "mapping": [{"src": "dax", "tgt": "RED"}], "support": [{"input": "dax", "output": "RED"}],
              "query": [{"input": "dax blicket", "output": "RED"}]}
    assert record_problems(record, "val-00000000", {"episode_type": "ME", "split": "val"},
                           ({"dax"}, {"RED"})) == ["input tokens not in the input vocabulary: ['blicket']"]


# --- dataset cards: datasets.load_dataset offline -------------------------------------------------------

LOAD_SCRIPT = """
import json, sys, datasets
out = {}
for name, path in json.loads(sys.argv[1]).items():
    ds = datasets.load_dataset(path, cache_dir=sys.argv[2])
    out[name] = {split: {"rows": d.num_rows, "columns": d.column_names,
                         "features": repr(d.features), "first": d[0]} for split, d in ds.items()}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """Stores of every type and one parquet export, loaded by `datasets` in a fresh offline process."""
    tmp = tmp_path_factory.mktemp("hf")
    stores = {t: generate(config(tmp, episode_type=t, num_episodes=30)) for t in EPISODE_TYPES}
    export = Path(publish(stores["scan_length"], to=str(tmp / "export")))
    paths = {**{t: str(s) for t, s in stores.items()}, "export": str(export)}
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, json.dumps(paths), str(tmp / "cache")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return stores, json.loads(result.stdout)


def expected_features(store: bool):
    """The schema the cards pin: the record's fields, as columns (parquet) or inside `json` (webdataset)."""
    from datasets import Features, List, Value

    def pairs(a: str, b: str):
        return List({a: Value("string"), b: Value("string")})
    record = {"episode_type": Value("string"), "split": Value("string"), "index": Value("int64"),
              "identifier": Value("string"), "mapping": pairs("src", "tgt"), "support": pairs("input", "output"),
              "query": pairs("input", "output")}
    if not store:
        return Features(record)
    return Features({"json": record, "__key__": Value("string"), "__url__": Value("string")})


@pytest.mark.parametrize("episode_type", EPISODE_TYPES)
def test_load_dataset_reads_every_store_offline(loaded, episode_type):
    stores, result = loaded
    splits = result[episode_type]
    assert {s: v["rows"] for s, v in splits.items()} == {"train": 30, "validation": 5}
    for split, name in (("train", "train"), ("validation", "val")):
        assert splits[split]["columns"] == ["json", "__key__", "__url__"]
        assert splits[split]["features"] == repr(expected_features(store=True))  # pinned: nothing inferred
        first = splits[split]["first"]
        assert first["__key__"] == f"{name}-00000000"
        assert first["json"] == records(shard_paths(stores[episode_type], name)[0])[0][1]


def test_publish_exports_parquet_that_load_dataset_reads(loaded):
    stores, result = loaded
    export = result["export"]
    assert {s: v["rows"] for s, v in export.items()} == {"train": 30, "validation": 5}
    assert export["train"]["features"] == repr(expected_features(store=False))
    assert export["validation"]["first"] == records(shard_paths(stores["scan_length"], "val")[0])[0][1]


def test_publish_refuses_a_damaged_store_and_a_foreign_directory(tmp_path, store_copy, small_store):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an earlier export"):
        publish(small_store, to=str(tmp_path / "mine"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    damage_flip(store_copy)
    with pytest.raises(UserError, match="fails verification"):
        publish(store_copy, to=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of"), ({"to": "x", "repo_id": "a/b"}, "exactly one of"),
    ({"repo_id": "no-slash"}, "USER/NAME"), ({"repo_id": "a/b c"}, "USER/NAME"),
])
def test_publish_arguments(small_store, kwargs, message):
    with pytest.raises(UserError, match=message):
        publish(small_store, **kwargs)


def test_publish_replaces_an_earlier_export(tmp_path, small_store):
    first = Path(publish(small_store, to=str(tmp_path / "export")))
    before = {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()}
    again = Path(publish(small_store, to=str(tmp_path / "export")))
    assert {p.relative_to(again): p.read_bytes() for p in again.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temp directory left


def test_corrupt_tar_header_is_reported(store_copy):
    data = bytearray((store_copy / "val-000000.tar").read_bytes())
    data[10] ^= 0xFF  # inside the first member's name: the header checksum no longer matches
    (store_copy / "val-000000.tar").write_bytes(bytes(data))
    problems = verify_store(store_copy)
    assert any(p.startswith("val-000000.tar:") and "sha256" in p for p in problems)
    assert any(p.startswith("val-000000.tar:") and ("unreadable" in p or "holds 0" in p) for p in problems)
    with pytest.raises(tarfile.TarError):
        list(read_shard(store_copy / "val-000000.tar"))


def test_a_failed_write_names_its_file_and_leaves_no_temp_file(tmp_path):
    # A full disk fails inside write(), with no file name in the error: the error must say which file it was.
    import errno

    from pipeline.shardio import write_atomically

    def full_disk(raw):
        raise OSError(errno.ENOSPC, "No space left on device")

    target = tmp_path / "net_ME.pt"
    with pytest.raises(OSError) as failure:
        write_atomically(target, full_disk)
    assert failure.value.errno == errno.ENOSPC and failure.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []
