"""benchmarks/compare.py's pure pieces (the full script takes minutes even with --quick) and the analytic
valid-token FLOP count it reports (benchmarks/flops.py), checked against torch's own FlopCounterMode."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import compare  # noqa: E402
from flops import forward_flops  # noqa: E402
from machine import cpu_info  # noqa: E402
from trainer.batch import make_batch  # noqa: E402
from trainer.model import MetaSeq2Seq, ModelConfig  # noqa: E402
from trainer.runlog import log_line  # noqa: E402

ORIGINAL = compare.DEFAULT_ORIGINAL
needs_original = pytest.mark.skipif(compare.skip_reason(ORIGINAL) is not None,
                                    reason=str(compare.skip_reason(ORIGINAL)))

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512dq avx512_bf16 avx512_vnni
processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512dq avx512_bf16 avx512_vnni
"""


def test_steady_rate_cancels_start_up():
    # 4 s of start-up and 0.1 s per episode: 10 episodes/s whatever the start-up, on the median per length.
    assert compare.steady_rate([(100, 14.0), (600, 64.0)]) == pytest.approx(10.0)
    runs = [(100, 14.0), (600, 64.0), (100, 30.0), (600, 63.0), (100, 13.0), (600, 65.0)]
    assert compare.steady_rate(runs) == pytest.approx(500 / (64.0 - 14.0))
    with pytest.raises(ValueError, match="two lengths"):
        compare.steady_rate([(100, 14.0), (100, 15.0)])
    with pytest.raises(ValueError, match="not slower"):
        compare.steady_rate([(100, 20.0), (600, 19.0)])


def test_cpu_flags_parser():
    info = cpu_info(CPUINFO)
    assert info["model"] == "AMD EPYC 9R14 96-Core Processor" and info["logical_cpus"] == 2
    assert info["flags"] == {"avx2": True, "avx512f": True, "avx512_bf16": True, "amx_tile": False,
                             "amx_bf16": False}
    assert info["native_bf16"] and not info["amx"]
    avx2_only = cpu_info(CPUINFO.replace(" avx512f avx512dq avx512_bf16", ""))
    assert avx2_only["flags"]["avx2"] and not avx2_only["flags"]["avx512f"] and not avx2_only["native_bf16"]
    sapphire = cpu_info(CPUINFO.replace("avx512_vnni", "avx512_vnni amx_bf16 amx_tile amx_int8"))
    assert sapphire["amx"] and sapphire["flags"]["amx_tile"]


def test_our_validation_lines_are_recognised():
    lines = [log_line(SimpleNamespace(episodes_done=n, last_val={"retrieval": 100.0, "generalization": g}), 30.0, 0.1)
             for n, g in ((3900, 87.5), (4000, 100.0), (4100, 100.0))]
    assert compare.first_at_threshold(["no store: generating", *lines], compare.OUR_LINE, 100.0) == (4000, 100.0)
    assert compare.first_at_threshold(lines, compare.OUR_LINE, 101.0) is None


@needs_original
def test_original_validation_lines_are_recognised():
    # The format string is read from the original's train.py, so a mismatch with its real output shows here.
    source = (ORIGINAL / "train.py").read_text()
    fmt = re.search(r"print\('(\{:s\} \(\{:d\}[^']*ValAccGeneralize[^']*)'\.format", source).group(1)
    lines = [fmt.format("1m 2s (- 9m 3s)", n, n / 100, 0.0123, 100.0, g) for n, g in ((3500, 92.0), (3600, 100.0))]
    assert compare.first_at_threshold(lines, compare.ORIGINAL_LINE, 100.0) == (3600, 100.0)


@pytest.mark.slow
@needs_original
def test_original_generation_is_timed_in_its_folder():
    done = subprocess.run([sys.executable, "-c", compare.ORIGINAL_GENERATION, "ME", "3"], cwd=ORIGINAL,
                          capture_output=True, text=True, timeout=120,
                          env=compare.child_env(1))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["episodes_per_s"] > 0


def test_skips_cleanly_without_the_original(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--original",
                           str(tmp_path / "absent")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert "absent" in json.loads(done.stdout)["skipped"] and "METASEQ2SEQ_ORIGINAL" in done.stderr
    assert done.stderr.startswith("compare.py: skipped: ")


def _uniform_episode(n_support: int, n_query: int, lengths: tuple[int, int, int, int], gen: torch.Generator):
    """An episode whose supports share their lengths and whose queries share theirs: no padding at all."""
    def seqs(n, length, vocab):
        return [torch.randint(3, vocab, (length,), generator=gen).tolist() for _ in range(n)]
    si, so, qi, qo = lengths
    return list(zip(seqs(n_support, si, 12), seqs(n_support, so, 9))), list(zip(seqs(n_query, qi, 12), seqs(n_query, qo, 9)))


@pytest.mark.filterwarnings("ignore:TF32 acceleration")  # torch's note when oneDNN flags are touched
@pytest.mark.parametrize("memory, attention", [(True, True), (False, True), (True, False)])
def test_valid_token_flops_equal_torch_count_without_padding(memory, attention):
    gen = torch.Generator().manual_seed(0)
    cfg = ModelConfig(input_vocab_size=12, output_vocab_size=9, emb_size=8, nlayers=2, dropout=0.0,
                      disable_memory=not memory, disable_attention=not attention)
    support, query = _uniform_episode(3, 5, (2, 4, 3, 2), gen)
    batch = make_batch([support], [query])
    model = MetaSeq2Seq(cfg)
    # oneDNN off: its fused LSTM kernel is invisible to FlopCounterMode; the decomposed LSTM is counted.
    with torch.backends.mkldnn.flags(enabled=False), FlopCounterMode(display=False) as counter:
        model(batch)
    assert counter.get_total_flops() == int(forward_flops(batch, cfg).sum()) > 0


def test_valid_token_flops_ignore_padding():
    gen = torch.Generator().manual_seed(1)
    cfg = ModelConfig(input_vocab_size=12, output_vocab_size=9, emb_size=8, nlayers=2, dropout=0.0)
    small = _uniform_episode(2, 3, (1, 2, 2, 3), gen)
    large = _uniform_episode(4, 6, (3, 5, 6, 9), gen)  # pads `small` in every dimension when batched with it
    alone = forward_flops(make_batch([small[0]], [small[1]]), cfg)
    together = forward_flops(make_batch([small[0], large[0]], [small[1], large[1]]), cfg)
    assert together[0] == alone[0] and together[1] > together[0]


def test_both_sides_see_the_gpu_only_when_asked():
    # The original takes the GPU whenever CUDA is visible: for a CPU comparison it must be hidden from both.
    assert compare.child_env(1)["CUDA_VISIBLE_DEVICES"] == ""
    on_gpu = compare.child_env(1, "cuda")
    assert on_gpu.get("CUDA_VISIBLE_DEVICES") != "" and on_gpu["OMP_NUM_THREADS"] == "1"
    argv = compare.our_train_argv("ME", 10, Path("s"), Path("d"), 1, device="cuda")
    assert argv[argv.index("--device") + 1] == "cuda"


# A stand-in for a training command: prints validation lines in the given format, one every `pause` seconds.
FAKE_TRAINING = """
import sys, time
fmt, pause = sys.argv[1], float(sys.argv[2])
for episode, generalization in ((100, 50.0), (200, 96.0), (300, 100.0)):
    time.sleep(pause)
    print(fmt.format(episode, generalization), flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("side_by_side", [False, True])
def test_time_to_accuracy_times_both_sides_and_can_run_them_at_once(monkeypatch, tmp_path, side_by_side):
    ours_fmt = "episode {} | 9.0 episodes/s | loss 0.1 | val retrieval 100.0% | val generalization {}%"
    original_fmt = "1m 2s (- 9m 3s) ({} 1% finished) TrainLoss: 0.1, ValAccRetrieval: 100.0, ValAccGeneralize: {}"
    fake = lambda fmt: [sys.executable, "-c", FAKE_TRAINING, fmt, "0.6"]  # noqa: E731
    threads_seen = []
    monkeypatch.setattr(compare, "original_train_argv", lambda *a, **k: fake(original_fmt))
    monkeypatch.setattr(compare, "our_train_argv",
                        lambda _type, _n, _store, _dir, threads_n, **k: threads_seen.append(threads_n) or fake(ours_fmt))
    args = SimpleNamespace(threads=2, device="cpu", tta_side_by_side=side_by_side, tta_seed=3,
                           original=tmp_path, tta_timeout=60)
    start = time.perf_counter()
    report = compare.time_to_accuracy("scan_prim_permutation", args, tmp_path)  # 95%: the line at episode 200
    wall = time.perf_counter() - start
    for side in ("original", "ours (default recipe)"):
        assert report[side]["reached"] and report[side]["episode"] == 200 and report[side]["generalization"] == 96.0
        assert report[side]["seconds"] >= 1.2
    assert threads_seen == [1 if side_by_side else 2] and report["threads_per_side"] == threads_seen[0]
    assert (wall < 2.3) if side_by_side else (wall >= 2.4)  # at once: about one side's time; in turn: both
