"""Index replacement under kills, concurrency and arbitrary sequences of operations, in real
processes: the name always holds a complete index (the old or the new one), readers never see
a half-done swap, writers never corrupt each other, and nothing temporary outlives the next
build."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from icl_engine.core.data import Dataset, TaskKind, make_records
from icl_engine.core.embed import get_embedder
from icl_engine.core.index import ExampleIndex, IndexExistsError, IndexFormatError, delete_index, store

from conftest import said

pytestmark = pytest.mark.slow  # writers and readers in processes of their own, killed

ICL = Path(sys.executable).with_name("icl")

# The child processes build these two datasets (seeded, so the parent knows their hashes).
DATASETS = """
import random
from icl_engine.core.data import Dataset, TaskKind, make_records
from icl_engine.core.embed import get_embedder
from icl_engine.core.index import ExampleIndex

def dataset(n, seed):
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(500)]
    pairs = [(" ".join(rng.choices(words, k=10)), rng.choice(["neg", "pos"])) for _ in range(n)]
    return Dataset(f"d{seed}", TaskKind.CLASSIFICATION, make_records(pairs), ("neg", "pos"))

emb = get_embedder("hashing:64")
A, B = ExampleIndex.build(dataset(N_A, 1), emb), ExampleIndex.build(dataset(N_B, 2), emb)
"""
N_A, N_B = 3000, 2000


def dataset(n: int, seed: int) -> Dataset:
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(500)]
    pairs = [(" ".join(rng.choices(words, k=10)), rng.choice(["neg", "pos"])) for _ in range(n)]
    return Dataset(f"d{seed}", TaskKind.CLASSIFICATION, make_records(pairs), ("neg", "pos"))


@pytest.fixture(scope="module")
def hashes():
    """dataset hash -> A, B (the children's), C (what check_clean_after_next_build saves)."""
    return {dataset(N_A, 1).sha256: "A", dataset(N_B, 2).sha256: "B", dataset(50, 3).sha256: "C"}


def child(body: str) -> subprocess.Popen:
    code = DATASETS.replace("N_A", str(N_A)).replace("N_B", str(N_B)) + textwrap.dedent(body)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen, word: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.strip() == word:
            return
        if not line and proc.poll() is not None:
            raise AssertionError(f"child ended before {word!r}: {proc.stderr.read()[-2000:]}")
    raise AssertionError(f"no {word!r} from the child in {timeout} s")


def check_holds(folder: Path, hashes: dict, allowed: set) -> str:
    """The index at `folder` loads completely and is one of the allowed versions."""
    index = ExampleIndex.load(folder)
    which = hashes.get(index.dataset.sha256)
    assert which in allowed, f"the index holds {which or 'an unknown dataset'}, expected one of {allowed}"
    index.search(index.vectors[:2], 4)
    return which


def check_clean_after_next_build(folder: Path) -> None:
    index = ExampleIndex.build(dataset(50, 3), get_embedder("hashing:64"))
    index.save(folder, replace=True)
    names = sorted(p.name for p in folder.iterdir())
    assert not [n for n in names if n.startswith(".tmp-")], names
    assert len([n for n in names if n.startswith("v-")]) <= 2 and "CURRENT" in names
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]


# ----------------------------------------------------------------------------- kills


def test_kill_9_at_random_points_of_rebuilds(tmp_path, hashes):
    """Builds killed at random moments of a loop of rebuilds (mostly inside a save). Each step of
    a publish is killed deliberately by test_kill_9_at_each_step_of_a_publish; these few random
    points add what falls between the steps."""
    folder = tmp_path / "indexes" / "rt"
    rng = random.Random(0)
    survived, trials = 0, 10
    for trial in range(trials):
        proc = child(f"""
            import sys
            folder = {str(folder)!r}
            print("ready", flush=True)
            for i in range(10**6):
                (A if i % 2 else B).save(folder, replace=True)
        """)
        wait_for(proc, "ready")
        time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close(), proc.stderr.close()
        if (folder / "CURRENT").exists():
            check_holds(folder, hashes, {"A", "B", "C"})
            survived += 1
        else:  # killed during the very first save: nothing published, and nothing to load
            with pytest.raises(IndexFormatError):
                ExampleIndex.load(folder)
        if trial % 5 == 4:  # and the next build cleans up what the killed ones left
            check_clean_after_next_build(folder)
    print(f"\n{trials} kill -9 during rebuilds: {survived} left a complete published index, {trials - survived} "
          "hit the very first save (nothing published, load refused)")
    assert survived >= trials - 1  # only the first trial can find nothing published yet


@pytest.mark.parametrize("step, expect", [
    ("_fsync_tree", "A"),  # the new version is written, not yet renamed into place
    ("switch_pointer", "A"),  # renamed into place: the exact step between writing and switching
    ("collect_garbage", "B"),  # switched, old versions not yet removed
])
def test_kill_9_at_each_step_of_a_publish(tmp_path, hashes, step, expect):
    folder = tmp_path / "indexes" / "rt"
    proc = child(f"""
        import time
        from icl_engine.core.index import store
        folder = {str(folder)!r}
        A.save(folder)
        real = getattr(store, {step!r})
        def paused(*args, **kw):
            real(*args, **kw) if {step!r} == "_fsync_tree" else None
            print("paused", flush=True)
            time.sleep(120)
        setattr(store, {step!r}, paused)
        B.save(folder, replace=True)
    """)
    wait_for(proc, "paused")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close(), proc.stderr.close()
    assert check_holds(folder, hashes, {expect}) == expect
    check_clean_after_next_build(folder)


def test_a_killed_builders_scratch_is_removed_by_the_next_build_a_live_ones_kept(tmp_path):
    """A streaming build's scratch folder (store.scratch_folder, locked while its builder runs):
    a real `icl index build --ray --index-type ivfpq_disk` killed with SIGKILL mid-way (once its
    scratch folder is there; its Ray address answers nothing, so it waits there, no cluster
    needed) leaves it; the next build of any name in that indexes folder removes it; one whose
    builder is alive in another process is kept; nothing else is touched (a look-alike folder
    without a lock, other files, anything outside the folder)."""
    pytest.importorskip("ray", reason="--ray needs Ray installed (pip install 'icl-engine[ray]')")
    from icl_engine.apps import indexes

    ix = tmp_path / "indexes"
    ix.mkdir()
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"text {i}", "label": "ab"[i % 2]}) + "\n" for i in range(6)))
    killed = subprocess.Popen([str(ICL), "index", "build", str(data), "--name", "dead", "--ray", "--address",
                               "127.0.0.1:9", "--index-type", "ivfpq_disk", "--embedder", "hashing:32",
                               "--indexes-dir", str(ix)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    live = subprocess.Popen(  # a builder that lives on, inside its scratch folder
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\nfrom icl_engine.core.index.store import scratch_folder\n"
         "with scratch_folder(Path(sys.argv[1]), 'live') as s:\n    print(s, flush=True)\n    time.sleep(300)", str(ix)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        alive = Path(live.stdout.readline().strip())
        deadline = time.monotonic() + 120
        while not list(ix.glob(".dead.build-*")):
            assert killed.poll() is None and time.monotonic() < deadline, killed.stderr.read()[-2000:]
            time.sleep(0.01)
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        dead = next(ix.glob(".dead.build-*"))
        assert dead.is_dir() and (dead / store.LOCK).exists()  # a killed builder cannot clean up
        assert alive.parent == ix and alive.name.startswith(".live.build-") and alive.is_dir()
        unlocked = ix / ".other.build-0123abcd"  # the name, but no lock file: not scratch_folder's
        unlocked.mkdir()
        outside = tmp_path / ".x.build-0123abcd"  # a dead scratch, but outside the indexes folder
        outside.mkdir()
        (outside / store.LOCK).touch()
        (ix / "notes.txt").write_text("kept")
        indexes.build_index(str(data), "another", embedder="hashing:32", indexes_dir=ix)  # a plain build of another name
        assert not dead.exists()
        assert alive.is_dir() and live.poll() is None  # a live build's scratch is kept
        assert unlocked.is_dir() and outside.is_dir() and (ix / "notes.txt").read_text() == "kept"
        assert store.remove_dead_scratch(ix) == []  # nothing more to remove while the live one runs
    finally:
        for proc in (killed, live):
            proc.kill()
            proc.wait(timeout=30)
    assert store.remove_dead_scratch(ix) == [alive]  # its builder is gone now


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_sigint_during_a_build_prints_one_line_and_keeps_the_old_index(tmp_path):
    data = tmp_path / "big.jsonl"
    rng = random.Random(0)
    data.write_text("".join(json.dumps({"text": " ".join(rng.choices(["a", "b", "c", "d"], k=200)) + f" {i}",
                                        "label": rng.choice(["x", "y"])}) + "\n" for i in range(60000)))
    small = tmp_path / "small.jsonl"
    small.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    env_dir = ["--indexes-dir", str(tmp_path / "indexes"), "--embedder", "hashing:64"]
    subprocess.run([str(ICL), "index", "build", str(small), "--name", "rt", *env_dir], check=True, capture_output=True)
    # the child starts with Ctrl-C's default disposition and unblocked, whatever this worker
    # process inherited (a shell gives a command exactly that)
    proc = subprocess.Popen([str(ICL), "index", "build", str(data), "--name", "rt", "--force", *env_dir],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    seen = []
    for line in proc.stderr:  # the embedding's first progress line: the build is past start-up and reading
        seen.append(line)
        if "embedding" in line:
            break
    assert proc.poll() is None, f"the build finished before its embedding said anything: {''.join(seen)}"
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    err = "".join(seen) + rest
    assert proc.returncode == 130, err
    assert said(err) == ["interrupted: the index was left as it was (a new one is published only when complete)"]
    assert len(ExampleIndex.load(tmp_path / "indexes" / "rt")) == 2


# ----------------------------------------------------------------------------- concurrency

READER = """
import json, sys
from pathlib import Path
import numpy as np
from icl_engine.core.index import ExampleIndex
folder, known, ready, done, at_least = {folder!r}, {known!r}, Path({ready!r}), Path({done!r}), {at_least}
reads = failed = 0
errors = []
while not done.exists() or reads + failed < at_least:
    try:
        index = ExampleIndex.load(folder)
        scores, ids = index.search(index.vectors[:3], 5)
        ok = index.dataset.sha256 in known and (ids >= 0).all() and np.isfinite(scores).all()
        ok = ok and index.manifest["count"] == len(index.records) == len(index.vectors)
        if not ok:
            raise ValueError("inconsistent read")
        reads += 1
    except Exception as e:
        failed += 1
        errors.append(f"{{type(e).__name__}}: {{e}}"[:200])
    if reads + failed == 1:
        ready.touch()  # the writer starts once every reader is reading
print(json.dumps({{"reads": reads, "failed": failed, "errors": errors[:5]}}))
"""


def race(tmp_path: Path, folder: Path, known, start_writer, n_readers: int, at_least: int) -> tuple[str, list[dict]]:
    """Readers that load and search `folder` while the writer `start_writer(ready, done)` runs:
    the writer starts writing once every reader has read (it waits for the `ready` files) and
    touches `done` when it has finished; each reader reads until then, and at least `at_least`
    times. Returns the writer's stdout and the readers' counts."""
    ready = [tmp_path / f"reader-{i}.ready" for i in range(n_readers)]
    done = tmp_path / "writer.done"
    readers = [subprocess.Popen([sys.executable, "-c", READER.format(
        folder=str(folder), known=sorted(known), ready=str(r), done=str(done), at_least=at_least)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in ready]
    writer = start_writer([str(r) for r in ready], str(done))
    try:
        out, err = writer.communicate(timeout=600)
        assert writer.returncode == 0, err
        results = []
        for r in readers:
            rout, rerr = r.communicate(timeout=600)
            assert r.returncode == 0, rerr
            results.append(json.loads(rout))
    finally:
        done.touch()  # readers left behind by a failed writer stop too
        for p in (writer, *readers):
            p.kill()
            p.wait()
    return out, results


WAIT_FOR_READERS = """
import time
from pathlib import Path
while not all(Path(p).exists() for p in {ready!r}):
    time.sleep(0.01)  # polls a condition: the readers' first reads
"""


def test_one_writer_four_readers_over_eight_rebuilds(tmp_path, hashes):
    """Four readers load and search the name while a writer replaces it again and again. Counted
    in rebuilds, not seconds: the writer starts once every reader has read and does `saves`
    replacements; the readers read until it is done (at least `at_least` times each)."""
    folder = tmp_path / "indexes" / "rt"
    ExampleIndex.build(dataset(N_A, 1), get_embedder("hashing:64")).save(folder)
    saves, at_least, n_readers = 8, 25, 4
    out, results = race(tmp_path, folder, hashes, lambda ready, done: child(WAIT_FOR_READERS.format(ready=ready) + f"""
for i in range({saves}):
    (B if i % 2 == 0 else A).save({str(folder)!r}, replace=True)
Path({done!r}).touch()
print({saves}, flush=True)
"""), n_readers, at_least)
    reads, failed = sum(r["reads"] for r in results), sum(r["failed"] for r in results)
    print(f"\n{out.strip()} rebuilds, {reads} reads by {n_readers} readers, {failed} failed")
    assert failed == 0, [r["errors"] for r in results]
    assert int(out.strip()) == saves and reads >= n_readers * at_least
    check_holds(folder, hashes, {"A", "B"})


def test_two_cli_writers_on_one_name(tmp_path):
    """Both finish (the second waits for the lock) or one gets the lock error: never a broken index."""
    data = []
    for i, n in enumerate((400, 300)):
        path = tmp_path / f"d{i}.jsonl"
        path.write_text("".join(json.dumps({"text": f"review {j} of {i}", "label": "ab"[j % 2]}) + "\n" for j in range(n)))
        data.append(path)
    args = ["--name", "rt", "--indexes-dir", str(tmp_path / "indexes"), "--embedder", "hashing:64", "--force"]
    outcomes = []
    for _ in range(3):
        procs = [subprocess.Popen([str(ICL), "index", "build", str(d), *args], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for d in data]
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0 or (p.returncode == 1 and "being written by another process" in err), err
            outcomes.append(p.returncode)
        assert len(ExampleIndex.load(tmp_path / "indexes" / "rt")) in (400, 300)
    assert outcomes.count(0) >= 3


# ----------------------------------------------------------------------------- a state machine


class IndexFolder(RuleBasedStateMachine):
    """build / rebuild / corrupt / load / delete / failed saves, checking the folder after each."""

    pools: dict[str, ExampleIndex] = {}

    def __init__(self):
        super().__init__()
        self.root = Path(tempfile.mkdtemp())
        (self.root / "indexes").mkdir()
        (self.root / "neighbour.txt").write_text("mine")
        self.folder = self.root / "indexes" / "rt"
        self.holds: str | None = None  # which pool the name should hold
        self.corrupt = False
        if not self.pools:
            emb = get_embedder("hashing:32")
            for name, n, seed in (("A", 20, 1), ("B", 30, 2), ("C", 25, 3)):
                self.pools[name] = ExampleIndex.build(dataset(n, seed), emb)

    def teardown(self):
        shutil.rmtree(self.root, ignore_errors=True)

    @rule(which=st.sampled_from("ABC"), force=st.booleans())
    def build(self, which, force):
        if self.holds is not None and not force:
            with pytest.raises(IndexExistsError):
                self.pools[which].save(self.folder, replace=force)
            return
        self.pools[which].save(self.folder, replace=force)
        self.holds, self.corrupt = which, False

    @rule(which=st.sampled_from("ABC"), step=st.sampled_from(["np.save", "rename", "switch"]))
    def failed_rebuild(self, which, step):
        from icl_engine.core import index as index_mod

        target = {"np.save": (index_mod.np, "save"), "rename": (store.os, "rename"),
                  "switch": (store, "switch_pointer")}[step]
        real = getattr(*target)

        def boom(*a, **kw):
            raise OSError("No space left on device")

        setattr(*target, boom)
        try:
            with pytest.raises(OSError):
                self.pools[which].save(self.folder, replace=True)
        finally:
            setattr(*target, real)

    @precondition(lambda self: self.holds is not None)
    @rule(data=st.data())
    def corrupt_a_file(self, data):
        version = store.current_version(self.folder)
        name = data.draw(st.sampled_from(["index.faiss", "records.jsonl", "vectors.npy", "manifest.json"]))
        raw = (version / name).read_bytes()
        (version / name).write_bytes(raw[: len(raw) // 2])
        self.corrupt = True

    @rule()
    def load(self):
        if self.holds is None or self.corrupt:
            with pytest.raises(IndexFormatError):
                ExampleIndex.load(self.folder)
        else:
            assert ExampleIndex.load(self.folder).records == self.pools[self.holds].records

    @rule()
    def delete(self):
        if self.holds is None:
            with pytest.raises(ValueError):
                delete_index(self.folder)
        else:
            delete_index(self.folder)
            self.holds = None

    @invariant()
    def folder_is_consistent(self):
        assert sorted(p.name for p in self.root.iterdir()) == ["indexes", "neighbour.txt"]
        assert (self.root / "neighbour.txt").read_text() == "mine"
        siblings = sorted(p.name for p in (self.root / "indexes").iterdir())
        if self.holds is None:
            assert siblings in ([], ["rt"]) and (not self.folder.exists() or store.only_leftovers(self.folder))
            return
        assert siblings == ["rt"]
        names = sorted(p.name for p in self.folder.iterdir())
        versions = [n for n in names if n.startswith("v-")]
        assert set(names) - set(versions) <= {".lock", "CURRENT"} and 1 <= len(versions) <= 2, names
        assert store.current_version(self.folder).name in versions


TestIndexFolder = IndexFolder.TestCase
TestIndexFolder.settings = settings(max_examples=40, stateful_step_count=12, deadline=None)


# ----------------------------------------------------------------------------- incremental updates

# A base index and a batch that the writer adds and removes in turn: every published version
# holds either BASE or BASE + BATCH.
UPDATES = """
from icl_engine.core.index import update_index
BASE = A.dataset.select(range(N_BASE))
BATCH = A.dataset.records[N_BASE:]
"""
N_BASE = 2900


@pytest.fixture(scope="module")
def update_hashes():
    a = dataset(N_A, 1)
    return {a.select(range(N_BASE)).sha256: "base", a.sha256: "base+batch"}


def updater(body: str) -> subprocess.Popen:
    return child(UPDATES.replace("N_BASE", str(N_BASE)) + textwrap.dedent(body))


def test_readers_during_updates_see_the_old_or_the_new_version(tmp_path, update_hashes):
    """Counted in updates, not seconds (as the rebuild race above)."""
    folder = tmp_path / "indexes" / "rt"
    ExampleIndex.build(dataset(N_A, 1).select(range(N_BASE)), get_embedder("hashing:64")).save(folder)
    n_updates, at_least, n_readers = 6, 17, 3
    out, results = race(tmp_path, folder, update_hashes, lambda ready, done: updater(
        WAIT_FOR_READERS.format(ready=ready) + f"""
for i in range({n_updates}):
    if i % 2 == 0:
        update_index({str(folder)!r}, records=BATCH, embed=emb.encode)
    else:
        update_index({str(folder)!r}, remove_ids=[r.id for r in BATCH])
Path({done!r}).touch()
print({n_updates}, flush=True)
"""), n_readers, at_least)
    reads, failed = sum(r["reads"] for r in results), sum(r["failed"] for r in results)
    print(f"\n{out.strip()} updates (add 100 / remove 100), {reads} reads by {n_readers} readers, {failed} failed")
    assert failed == 0, [r["errors"] for r in results]
    assert int(out.strip()) == n_updates and reads >= n_readers * at_least
    check_holds(folder, update_hashes, {"base", "base+batch"})


@pytest.mark.parametrize("step, expect", [("switch_pointer", "base"), ("collect_garbage", "base+batch")])
def test_kill_9_during_an_update_leaves_the_old_or_the_new_version(tmp_path, update_hashes, step, expect):
    folder = tmp_path / "indexes" / "rt"
    proc = updater(f"""
        import time
        from icl_engine.core.index import store
        folder = {str(folder)!r}
        BASE_INDEX = ExampleIndex.build(BASE, emb)
        BASE_INDEX.save(folder)
        real = getattr(store, {step!r})
        def paused(*args, **kw):
            print("paused", flush=True)
            time.sleep(120)
        setattr(store, {step!r}, paused)
        update_index(folder, records=BATCH, embed=emb.encode)
    """)
    wait_for(proc, "paused")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close(), proc.stderr.close()
    assert check_holds(folder, update_hashes, {expect}) == expect
    # the next update starts from what is published and cleans up what the killed one left
    from icl_engine.core.index import update_index
    base = dataset(N_A, 1)
    r = update_index(folder, records=base.records[N_BASE:], embed=get_embedder("hashing:64").encode)
    assert r["count"] == N_A and check_holds(folder, update_hashes, {"base+batch"})
    names = sorted(p.name for p in folder.iterdir())
    assert not [n for n in names if n.startswith(".tmp-")] and len([n for n in names if n.startswith("v-")]) <= 2


def test_a_second_writer_waits_for_the_lock_or_fails_in_one_line(tmp_path):
    """While an update holds the lock, `icl index add` with a short $ICL_LOCK_TIMEOUT fails with one
    line and changes nothing; two adds at once both land (the second reads the first's version)."""
    folder = tmp_path / "indexes" / "rt"
    files = []
    for i in range(3):
        path = tmp_path / f"d{i}.jsonl"
        path.write_text("".join(json.dumps({"text": f"review {j} of {i}", "label": "ab"[j % 2]}) + "\n"
                                for j in range(50 + 10 * i)))
        files.append(path)
    ix = ["--indexes-dir", str(tmp_path / "indexes")]
    subprocess.run([str(ICL), "index", "build", str(files[0]), "--name", "rt", "--embedder", "hashing:64", *ix],
                   check=True, capture_output=True)
    holder = child(f"""
        import time
        from icl_engine.core.index import store
        with store.writer_lock(Path({str(folder)!r})):
            print("locked", flush=True)
            time.sleep(120)
    """.replace("Path(", "__import__('pathlib').Path("))
    wait_for(holder, "locked")
    env = {**os.environ, "ICL_LOCK_TIMEOUT": "1"}
    out = subprocess.run([str(ICL), "index", "add", "rt", str(files[1]), *ix], capture_output=True, text=True, env=env)
    holder.kill(), holder.wait(), holder.stdout.close(), holder.stderr.close()
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [
        f"error: index {str(folder)!r} is being written by another process (waited 1 s for its lock); try again later"]
    assert len(ExampleIndex.load(folder)) == 50
    procs = [subprocess.Popen([str(ICL), "index", "add", "rt", str(f), *ix], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for f in files[1:]]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert len(ExampleIndex.load(folder)) == 50 + 60 + 70  # no update lost
