import fcntl
import json
import os
import shutil

# Strict JAX: implicit rank promotion is a bug in this code base, not a convenience.
os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One CPU device, in this process and in every `jaxlmc` command a test starts (which would otherwise make one per core:
# shard.use_cpu_cores), so that a command's numbers compare bit for bit with the library's in this process. Tests of
# several devices set their own count.
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "1")
# One persistent XLA compilation cache for the whole session, shared by both xdist workers and every CLI subprocess
# (which inherit the environment): the suite compiles the same small programs many times over; a cached executable is
# the same program, so every bit-for-bit comparison still holds. Outside every run directory the tests inspect.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.environ.get("PYTEST_XDIST_TESTRUNUID") and f"/tmp/jaxlmc-xla-{os.environ['PYTEST_XDIST_TESTRUNUID']}"
    or f"/tmp/jaxlmc-xla-{os.getpid()}", "cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

from jaxlmc import config  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One TFDS data dir for the session: MNIST-1D variants are generated into it once (offline)."""
    path = str(tmp_path_factory.mktemp("tfds"))
    os.environ["JAXLMC_DATA_DIR"] = path  # for CLI subprocesses
    return path


TINY = [
    "data.pretrain_task=mnist1d", "pretrain.weight_decay=0.0",  # the 4000-signal default, not the study's 50,000
    "data.finetune_task=mnist1d/shifted",  # 4000 signals, not the study's 20,000
    'finetune.heads=["per_seed"]',  # one head policy (the controls are tested in test_controls)
    "model.width=32", "pretrain.steps=60", "pretrain.save_steps=[0, 20, 60]", "pretrain.batch_size=50",
    "finetune.pretrain_steps=[0, 60]", "finetune.lrs=[0.001, 0.01]", "finetune.seeds=2", "finetune.steps=40",
    "finetune.batch_size=50", "finetune.warmup_steps=0", "run.chunk_steps=10", "run.checkpoint_every=20",
    "data.train_eval_size=500",
    "finetune.scratch=false", "barriers.align=false",
    "study.fit_margin=-1",  # 40 steps fit nobody well: tests of other features keep every member (unfit: test_controls)
]


@pytest.fixture
def tiny_cfg(data_dir):
    """A config small enough for a few-second run: 2 checkpoints × 2 lrs × 2 seeds = 8 members."""
    return config.load("configs/mnist1d.toml", TINY + [f"data.data_dir={data_dir!r}".replace("'", '"')])


@pytest.fixture(scope="session")
def build_once(tmp_path_factory):
    """build(name, make) -> (path, result): `make(path)` (returning something JSON can hold) runs once in the whole
    test session, in whichever xdist worker asks first while the others wait for it; every caller then gets a private
    copy of the directory, so a module that changes its copy affects no other worker."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the session's, shared by its workers

    def build(name: str, make):
        shared, record = root / f"shared-{name}", root / f"shared-{name}.json"
        with open(root / f"shared-{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not record.exists():
                shutil.rmtree(shared, ignore_errors=True)
                record.write_text(json.dumps(make(str(shared))))
        mine = tmp_path_factory.mktemp(name) / "run"
        shutil.copytree(shared, mine)
        return str(mine), json.loads(record.read_text())
    return build
