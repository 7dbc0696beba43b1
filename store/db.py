"""Store: the LMDB environment that holds every pattern, the source of truth (DESIGN §7).

Shape legend: L MoE layers, E routed experts, N demos, D embedding dimension.

Layout, one named sub-db each:
    meta        schema_version, fingerprint (of the model every pattern belongs to), generation,
                embedding_dim
    domains     name -> JSON record (Pattern.record(): settings, counts, shapes, timestamps)
    scores      "name/criterion" -> array bytes, float32 [L, E]
    demos       name -> JSON list of {"prompt","response"} / {"text"}
    embeddings  name -> array bytes, float32 [N, D]

Every change is one write transaction and bumps `generation`, so a crash leaves either the old or
the new domain, and anything derived (the FAISS index) knows when it is stale. Every read is its
own short transaction: a server sees a domain registered by another process on its next call.
The environment is opened lazily per process (an LMDB handle must not cross a fork).
A store opened read-only (`read_only=True`, `domex serve --read-only`) writes nothing, not even on
open; every write on it, and every write LMDB refuses (permissions, full disk), is StoreUnwritable.
`compact()` rewrites the file without its free pages, refusing while another process has it open.

A writer killed inside its commit may leave its transaction on disk but not yet announced in the
lock file; processes that kept the store open then read the previous version (whole) until the
next write transaction anywhere takes the lock and adopts the newer one (whole as well).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Callable

import lmdb
import numpy as np

from domex.errors import DomainExists, FingerprintMismatch, StoreError, StoreUnwritable, UnknownDomain
from .pattern import Pattern, check_name, decode_array, encode_array, now

SCHEMA_VERSION = 1
DEFAULT_MAP_SIZE = 1 << 30  # 1 GiB of address space; the file grows only with the data
_SUBDBS = ("meta", "domains", "scores", "demos", "embeddings")
_MAX_GROWTHS = 16
_OPEN: dict[str, tuple] = {}  # resolved folder -> (pid, env, sub-dbs, read_only): one env per process and folder
_OPEN_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """Every domain of one store generation, read in one transaction; a request uses one from start to end.

    Immutable and shared: `Store.snapshot()` hands out the same object until the generation changes, so
    matchers key what they derive (centroids, signatures, thresholds) on `generation`.
    """

    generation: int
    patterns: dict[str, Pattern]  # name -> pattern, sorted by name

    @property
    def names(self) -> list[str]:
        return list(self.patterns)

    def __contains__(self, name: str) -> bool:
        return name in self.patterns

    def get(self, name: str) -> Pattern:
        if name not in self.patterns:
            raise UnknownDomain(f"no domain {name!r} in this store generation ({self.generation}); "
                                f"registered: {', '.join(self.patterns) or 'none'}")
        return self.patterns[name]

    def embeddings(self) -> tuple[list[str], np.ndarray]:
        """(domain label per row, float32 [N_all, D]) of every demo."""
        labels = [n for n, p in self.patterns.items() for _ in range(len(p.embeddings))]
        blocks = [p.embeddings for p in self.patterns.values()]
        return labels, (np.concatenate(blocks) if blocks else np.zeros((0, 0), dtype=np.float32))


class PerGeneration:
    """What a reader derives from a snapshot (an index, thresholds), built once per generation.

    The newest two generations are kept: a request still on the older snapshot while a registration
    lands gets its own. Reads take no lock; a build holds it, so a generation is built once.
    """

    def __init__(self, build: Callable[[Snapshot], object]):
        self.build = build
        self._built: dict[int, object] = {}
        self._lock = threading.Lock()

    @property
    def newest(self) -> int:
        """The newest generation built; -1 before the first."""
        return max(self._built, default=-1)

    def get(self, snapshot: Snapshot):
        built = self._built.get(snapshot.generation)
        if built is not None:
            return built
        with self._lock:
            built = self._built.get(snapshot.generation)
            if built is None:
                built = self.build(snapshot)
                self._built = {g: b for g, b in self._built.items() if g > snapshot.generation - 2} | {snapshot.generation: built}
        return built


def _json(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


class Store:
    """Patterns of one model, in one LMDB folder; open with Store.open()."""

    def __init__(self, path: Path, map_size: int = DEFAULT_MAP_SIZE, read_only: bool = False):
        self.path = Path(path)
        self.map_size = map_size
        self.read_only = read_only
        self.write_error: str | None = None  # the last write LMDB refused, until a write succeeds
        self._dbs: dict[str, object] = {}
        self._snapshot: Snapshot | None = None
        self._snapshot_lock = threading.Lock()

    @classmethod
    def open(cls, path: str | Path, fingerprint: str | None = None, create: bool = True, map_size: int = DEFAULT_MAP_SIZE,
             read_only: bool = False) -> "Store":
        """Open (or create) the store at `path`; FingerprintMismatch if it belongs to another model.

        read_only: LMDB opened read-only, nothing written (a store on a read-only volume or owned by another user).
        """
        path = Path(path)
        if (not create or read_only) and not (path / "data.mdb").is_file():
            raise StoreError(f"no pattern store at {path}; register a domain first (it creates the store) or pass the right --store")
        store = cls(path, map_size, read_only)
        stored = store.fingerprint()
        if fingerprint is not None and stored is not None and stored != fingerprint:
            raise FingerprintMismatch(
                f"store {path} was made for the model with fingerprint {stored}, but this model's fingerprint is "
                f"{fingerprint}; use another --store folder for this model, or re-register its domains there"
            )
        if fingerprint is not None and stored is None and not read_only:
            store._write(lambda txn: store._claim(txn, fingerprint))
        return store

    # -- environment: lazy, per process ------------------------------------------------------

    def _env(self) -> lmdb.Environment:
        """This process's environment for the folder (LMDB allows one per process and path)."""
        key = str(self.path.resolve())
        opened = _OPEN.get(key)
        if opened is None or opened[0] != os.getpid():
            with _OPEN_LOCK:
                opened = _OPEN.get(key)
                if opened is None or opened[0] != os.getpid():
                    if opened is not None:
                        # opened before a fork: LMDB forbids using it here and py-lmdb refuses a second
                        # open while it is open. Closing is safe: with no cached read txns it frees
                        # only this process's reader slots and mappings, never the parent's
                        opened[1].close()
                    opened = _OPEN[key] = (os.getpid(), *self._open_env(), self.read_only)
        if opened[3] != self.read_only:
            raise StoreError(f"store {self.path} is open {'read-only' if opened[3] else 'for writing'} in this process "
                             "already; open every Store on one folder in the same mode")
        self._dbs = opened[2]
        return opened[1]

    def _open_env(self) -> tuple[lmdb.Environment, dict]:
        if not self.read_only:
            self.path.mkdir(parents=True, exist_ok=True)
        try:
            env = lmdb.open(str(self.path), map_size=self.map_size, max_dbs=len(_SUBDBS), max_spare_txns=0,
                            readonly=self.read_only, create=not self.read_only)
        except lmdb.Error as e:
            hint = "" if self.read_only else " (a store you may only read: serve it with --read-only)"
            raise StoreError(f"cannot open the pattern store at {self.path}: {e}; check the folder and its permissions{hint}") from None
        env.reader_check()  # free reader slots of processes that died (a killed server)
        dbs = {name: env.open_db(name.encode(), create=not self.read_only) for name in _SUBDBS}
        if self.read_only:
            with env.begin() as txn:
                version = txn.get(b"schema_version", db=dbs["meta"])
            if version is None or int(version) != SCHEMA_VERSION:
                env.close()
                raise StoreError(f"store {self.path} has schema version {version and int(version)}, this domex reads "
                                 f"{SCHEMA_VERSION}; re-register the domains into a new --store folder")
            return env, dbs
        # a write txn even for a reader: it creates meta on first use, and taking the write lock
        # adopts a commit that a killed writer left unannounced
        with env.begin(write=True) as txn:
            version = txn.get(b"schema_version", db=dbs["meta"])
            if version is None:
                txn.put(b"schema_version", str(SCHEMA_VERSION).encode(), db=dbs["meta"])
                txn.put(b"generation", b"0", db=dbs["meta"])
            elif int(version) != SCHEMA_VERSION:
                env.close()
                raise StoreError(
                    f"store {self.path} has schema version {int(version)}, this domex reads {SCHEMA_VERSION}; "
                    "re-register the domains into a new --store folder"
                )
        return env, dbs

    def _read(self, fn: Callable):
        """fn(txn) in one short read transaction."""
        for _ in range(_MAX_GROWTHS):
            env = self._env()
            try:
                with env.begin() as txn:
                    return fn(txn)
            except lmdb.MapResizedError:  # another process grew the map: adopt its size
                env.set_mapsize(0)
        raise StoreError(f"store {self.path}: the map kept changing size while reading; retry")

    def _write(self, fn: Callable):
        """fn(txn) in exactly one committed write transaction; a full map is grown and fn re-run.

        StoreUnwritable when the store is read-only or LMDB refuses the write; the reason stays in
        `write_error` (for /health) until a write succeeds.
        """
        self.require_writable()
        for _ in range(_MAX_GROWTHS):
            env = self._env()
            try:
                with env.begin(write=True) as txn:
                    result = fn(txn)
                self.write_error = None
                return result
            except lmdb.MapFullError:  # the aborted txn left nothing behind: grow and redo it
                env.set_mapsize(env.info()["map_size"] * 2)
            except lmdb.MapResizedError:
                env.set_mapsize(0)
            except lmdb.Error as e:
                self.write_error = f"store {self.path}: write failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
                raise StoreUnwritable(f"{self.write_error}; check the folder's permissions and free disk space") from None
        self.write_error = f"store {self.path}: the LMDB map could not grow enough for a write"
        raise StoreUnwritable(f"{self.write_error}; check free disk space")

    def require_writable(self) -> None:
        """StoreUnwritable when the store was opened read-only: checked before any costly work for a write."""
        if self.read_only:
            raise StoreUnwritable(f"store {self.path} is open read-only (--read-only); registering and deleting "
                                  "domains are off here, use a server or command that opens the store for writing")

    def write_problem(self) -> str | None:
        """Why a write would fail now (None when it would not, or when the store is read-only on purpose)."""
        if self.read_only:
            return None
        if self.write_error:
            return self.write_error
        unwritable = [p for p in (self.path, self.path / "data.mdb") if not os.access(p, os.W_OK)]
        return f"store {unwritable[0]} is not writable" if unwritable else None

    def close(self) -> None:
        """Close this process's environment for the folder (every Store on it reopens on next use)."""
        with _OPEN_LOCK:
            opened = _OPEN.get(str(self.path.resolve()))
            if opened is not None and opened[0] == os.getpid():
                del _OPEN[str(self.path.resolve())]
                opened[1].close()

    # -- reads -------------------------------------------------------------------------------

    def _meta(self, txn, key: str) -> str | None:
        value = txn.get(key.encode(), db=self._dbs["meta"])
        return None if value is None else bytes(value).decode()

    def fingerprint(self) -> str | None:
        """The model every pattern here belongs to; None until the first one is registered."""
        return self._read(lambda txn: self._meta(txn, "fingerprint"))

    def generation(self) -> int:
        """Counter bumped by every register and delete; derived data compares against it."""
        return self._read(lambda txn: int(self._meta(txn, "generation")))

    def names(self) -> list[str]:
        """Registered domain names, sorted."""
        return self._read(lambda txn: [bytes(k).decode() for k in txn.cursor(db=self._dbs["domains"]).iternext(values=False)])

    def __contains__(self, name: str) -> bool:
        return self._read(lambda txn: txn.get(name.encode(), db=self._dbs["domains"]) is not None)

    def _unknown(self, txn, name: str) -> UnknownDomain:
        known = [bytes(k).decode() for k in txn.cursor(db=self._dbs["domains"]).iternext(values=False)]
        return UnknownDomain(
            f"no domain {name!r} in store {self.path}; registered: {', '.join(known) or 'none'} "
            "(register it with `domex register`)"
        )

    def get(self, name: str) -> Pattern:
        """The whole pattern, read in one transaction (a consistent version)."""
        return self._read(lambda txn: self._get(txn, name))

    def _get(self, txn, name: str) -> Pattern:
        raw = txn.get(name.encode(), db=self._dbs["domains"])
        if raw is None:
            raise self._unknown(txn, name)
        record = json.loads(bytes(raw))
        scores = {}
        for criterion in record["criteria"]:
            key = f"{name}/{criterion}"
            value = txn.get(key.encode(), db=self._dbs["scores"])
            if value is None:
                raise StoreError(f"store {self.path}: domain {name!r} lacks scores {criterion!r}; the store is corrupt, re-register it")
            scores[criterion] = decode_array(value, where=f"{self.path}:scores/{key}")
        extras = {}
        for extra in record.get("extras", []):
            key = f"{name}/~{extra}"
            value = txn.get(key.encode(), db=self._dbs["scores"])
            if value is None:
                raise StoreError(f"store {self.path}: domain {name!r} lacks its {extra}; the store is corrupt, re-register it")
            extras[extra] = decode_array(value, where=f"{self.path}:scores/{key}")
        demos = json.loads(bytes(txn.get(name.encode(), db=self._dbs["demos"])))
        embeddings = decode_array(txn.get(name.encode(), db=self._dbs["embeddings"]), where=f"{self.path}:embeddings/{name}")
        return Pattern.from_parts(record, scores, demos, embeddings, extras)

    def snapshot(self) -> Snapshot:
        """All domains of the current generation, consistent with each other (one read transaction).

        Re-read only when the generation moved; otherwise the cached immutable snapshot is returned.
        """
        with self._snapshot_lock:
            if self._snapshot is not None and self._snapshot.generation == self.generation():
                return self._snapshot

            def collect(txn) -> Snapshot:
                names = [bytes(k).decode() for k in txn.cursor(db=self._dbs["domains"]).iternext(values=False)]
                return Snapshot(int(self._meta(txn, "generation")), {n: self._get(txn, n) for n in names})

            self._snapshot = self._read(collect)
            return self._snapshot

    # -- writes ------------------------------------------------------------------------------

    def _claim(self, txn, fingerprint: str) -> None:
        """Tie an empty store to a model, or refuse a pattern of another model."""
        stored = self._meta(txn, "fingerprint")
        if stored is None:
            txn.put(b"fingerprint", fingerprint.encode(), db=self._dbs["meta"])
        elif stored != fingerprint:
            raise FingerprintMismatch(
                f"store {self.path} holds patterns of the model with fingerprint {stored}, but this pattern was "
                f"made for fingerprint {fingerprint}; register it into a store for that model (another --store folder)"
            )

    def _bump(self, txn) -> int:
        generation = int(self._meta(txn, "generation")) + 1
        txn.put(b"generation", str(generation).encode(), db=self._dbs["meta"])
        return generation

    def _drop(self, txn, name: str, record: dict) -> None:
        for criterion in record["criteria"]:
            txn.delete(f"{name}/{criterion}".encode(), db=self._dbs["scores"])
        for extra in record.get("extras", []):
            txn.delete(f"{name}/~{extra}".encode(), db=self._dbs["scores"])
        for sub in ("domains", "demos", "embeddings"):
            txn.delete(name.encode(), db=self._dbs[sub])

    def register(self, pattern: Pattern, replace: bool = False) -> int:
        """Write a whole pattern in one transaction; returns the new generation.

        Replacing keeps the old `created` time. A crash at any point leaves the old version or the
        new one, never a mix, because LMDB commits the transaction as one.
        """
        name = check_name(pattern.name)
        key = name.encode()
        scores = {c: encode_array(s) for c, s in pattern.scores.items()}  # encode outside the txn: keep it short
        scores.update({f"~{n}": encode_array(a) for n, a in pattern.extras().items()})
        embeddings = encode_array(pattern.embeddings)
        demos = _json(pattern.demos)
        dim = pattern.embeddings.shape[1]

        def write(txn) -> int:
            self._claim(txn, pattern.fingerprint)
            stored_dim = self._meta(txn, "embedding_dim")
            if stored_dim is not None and int(stored_dim) != dim:
                raise StoreError(
                    f"domain {name!r} has {dim}-dimensional embeddings, the store's domains have {stored_dim}; "
                    "embed the demos with the store's embedder (all-MiniLM-L6-v2)"
                )
            txn.put(b"embedding_dim", str(dim).encode(), db=self._dbs["meta"])
            old = txn.get(key, db=self._dbs["domains"])
            current = pattern
            if old is not None:
                if not replace:
                    raise DomainExists(f"domain {name!r} is already registered in {self.path}; pass --replace (replace=True) to overwrite it")
                old_record = json.loads(bytes(old))
                self._drop(txn, name, old_record)
                current = dataclasses.replace(pattern, created=old_record["created"], updated=now())
            txn.put(key, _json(current.record()), db=self._dbs["domains"])
            for criterion, value in scores.items():
                txn.put(f"{name}/{criterion}".encode(), value, db=self._dbs["scores"])
            txn.put(key, demos, db=self._dbs["demos"])
            txn.put(key, embeddings, db=self._dbs["embeddings"])
            return self._bump(txn)

        return self._write(write)

    def delete(self, name: str) -> int:
        """Remove a domain in one transaction; returns the new generation."""

        def drop(txn) -> int:
            raw = txn.get(name.encode(), db=self._dbs["domains"])
            if raw is None:
                raise self._unknown(txn, name)
            self._drop(txn, name, json.loads(bytes(raw)))
            return self._bump(txn)

        return self._write(drop)


def compact(path: str | Path) -> tuple[int, int]:
    """Rewrite the store at `path` without its free pages; returns (bytes before, bytes after).

    LMDB never shrinks its file: deleted and replaced domains leave free pages. The copy is made
    next to the store and renamed over data.mdb (one atomic step). Every process that opens an LMDB
    environment holds a shared lock on lock.mdb, so an exclusive lock we can take proves nobody
    has the store open; we hold it until the new file is in place (an opener meanwhile waits).
    """
    path = Path(path)
    data, lock = path / "data.mdb", path / "lock.mdb"
    if not data.is_file():
        raise StoreError(f"no pattern store at {path}; pass the right --store")
    if str(path.resolve()) in _OPEN:
        raise StoreError(f"store {path} is open in this process; close it (Store.close()) before compacting")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
        except OSError:
            raise StoreError(f"store {path} is open in another process (a server or a registration); stop it, "
                             "then compact") from None
        before = data.stat().st_size
        with tempfile.TemporaryDirectory(dir=path, prefix=".compact-") as tmp:
            env = lmdb.open(str(path), max_dbs=len(_SUBDBS), readonly=True, lock=False)
            try:
                env.copy(tmp, compact=True)
            finally:
                env.close()
            os.replace(Path(tmp) / "data.mdb", data)
        return before, data.stat().st_size
    finally:
        os.close(fd)  # releases the lock


def compact_command(store: str) -> int:
    """`domex store compact`."""
    before, after = compact(store)
    print(f"compacted {store}: {before} -> {after} bytes")
    return 0
