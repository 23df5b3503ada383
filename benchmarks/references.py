"""Where the reference material lives that some tests and benchmarks run beside our code. Never imported by
the project's packages, and never copied into them.

- METASEQ2SEQ_ORIGINAL: the original code, a clone of facebookresearch/meta_seq2seq (the folder with its
  train.py and test.py). Default: ../shared/original beside the checkout.
- METASEQ2SEQ_SCAN: the official SCAN files, a clone of brendenlake/SCAN (its split folders are searched,
  so the clone works as it is) or a folder holding the tasks_*.txt files. Default: ../shared/scan.
- METASEQ2SEQ_MLC: MLC's few-shot task (Lake & Baroni 2023), a folder with few_shot_gold.txt (brendenlake/MLC's
  data_human/few_shot/val_gold/mini_scan.txt) and few_shot_human_00.txt ... (its val_behavior/ files).
  Default: ../shared/mlc.

Where one is absent, what needs it skips, and the skip message names the variable to set.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORIGINAL_VAR, SCAN_VAR, MLC_VAR = "METASEQ2SEQ_ORIGINAL", "METASEQ2SEQ_SCAN", "METASEQ2SEQ_MLC"
ORIGINAL_MODULES = ("model", "masked_cross_entropy", "generate_episode")  # the original imports these bare names


def _location(var: str, default: Path) -> Path:
    value = os.environ.get(var, "").strip()
    return Path(value).expanduser().resolve() if value else default


def original_dir() -> Path:
    """The original code's folder: $METASEQ2SEQ_ORIGINAL, else ../shared/original."""
    return _location(ORIGINAL_VAR, ROOT.parent / "shared" / "original")


def scan_dir() -> Path:
    """The official SCAN files: $METASEQ2SEQ_SCAN, else ../shared/scan."""
    return _location(SCAN_VAR, ROOT.parent / "shared" / "scan")


def mlc_dir() -> Path:
    """MLC's few-shot task files: $METASEQ2SEQ_MLC, else ../shared/mlc."""
    return _location(MLC_VAR, ROOT.parent / "shared" / "mlc")


def scan_file(name: str) -> Path | None:
    """The official SCAN file `name` (e.g. tasks_test_length.txt), directly in scan_dir() or in one of its
    folders (a clone of brendenlake/SCAN keeps them in add_prim_split/, length_split/, ...); None if absent."""
    folder = scan_dir()
    if (folder / name).is_file():
        return folder / name
    return next((path for path in sorted(folder.glob(f"*/{name}")) if path.is_file()), None)


def original_missing(path: Path | None = None) -> str:
    """The skip message where the original code is absent."""
    return (f"the original code (facebookresearch/meta_seq2seq) is not at {path or original_dir()}: set "
            f"{ORIGINAL_VAR} to a clone of it (README, 'Checks against the original code and SCAN')")


def scan_missing(name: str = "") -> str:
    """The skip message where an official SCAN file is absent."""
    what = f"the official SCAN file {name}" if name else "the official SCAN files"
    return (f"{what} (brendenlake/SCAN) not found in {scan_dir()}: set {SCAN_VAR} to a clone of it "
            "(README, 'Checks against the original code and SCAN')")


def mlc_missing(name: str = "few_shot_gold.txt") -> str:
    """The skip message where MLC's few-shot task files are absent."""
    return (f"MLC's few-shot task file {name} (brendenlake/MLC, data_human/few_shot) is not in {mlc_dir()}: set "
            f"{MLC_VAR} to a folder that holds it (docs/mlc.md)")


@contextmanager
def original_importable(folder: Path | None = None):
    """The original's folder on sys.path while the block runs (its modules import each other by bare names).
    Afterwards sys.path and those bare names in sys.modules are as they were, so nothing of it leaks into
    whatever imports next in the same process (a test session)."""
    saved_path, saved_modules = list(sys.path), {name: sys.modules.get(name) for name in ORIGINAL_MODULES}
    sys.path.insert(0, str(folder or original_dir()))
    try:
        yield
    finally:
        sys.path[:] = saved_path
        for name, module in saved_modules.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def load_original_train(folder: Path | None = None, name: str = "original_train", keep_on_path: bool = False):
    """The original's train.py as a module named `name` (it imports model.py, masked_cross_entropy.py and
    generate_episode.py by their bare names). By default its folder is on sys.path only while it loads, as in
    original_importable; keep_on_path leaves it there, for a script that goes on to run the original's code."""
    folder = folder or original_dir()
    if not (folder / "train.py").is_file():
        raise FileNotFoundError(original_missing(folder))
    if keep_on_path:
        sys.path.insert(0, str(folder))
        return _exec_module(name, folder / "train.py")
    with original_importable(folder):
        return _exec_module(name, folder / "train.py")


def _exec_module(name: str, path: Path):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
