"""Exact Hamming-distance search over binary codes.

`HammingIndex` keeps codes packed into uint64 words (bit order of
`tbhvae.codes`) and answers k-nearest and radius queries by brute force:
XOR + popcount against every stored code, then an exact selection
(`tbhvae.search`).

Result order is fixed: ascending Hamming distance, ties broken by position in
the index (insertion order; equal to id order for default ids). The exact
backends (numpy, faiss) return identical results; the approximate one
(faiss_ivf: faiss.IndexBinaryIVF, for databases past an exact scan's reach)
searches only the `nprobe` nearest of `nlist` clusters, then orders its
candidates the same way.
"""
from __future__ import annotations

import dataclasses
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from tbhvae import search
from tbhvae.checks import atomic_path, check_count, check_labels, join_files, open_npz, split_files
from tbhvae.codes import check_bits, database_words, num_bytes, to_words, unpack_codes

FORMAT_NAME = "tbhvae.hamming_index"
FORMAT_VERSION = 1
BACKENDS = ("auto", "numpy", "faiss", "faiss_ivf")

# backend="auto" picks faiss (when installed) from this code length on; below it, ties make
# faiss's exact re-ranking fetch far past k (BENCHMARKS.md, exact top-k search).
_AUTO_FAISS_MIN_BITS = 32


@dataclasses.dataclass(frozen=True)
class IVFSettings:
    """Clusters of the approximate backend (faiss_ivf); None: the defaults below, from n.

    nlist: clusters (default sqrt(n), at least 39 training codes each, as faiss asks);
    nprobe: clusters searched per query (default nlist / 8: recall@100 >= 0.95 on
    model codes of 10^6 in BENCHMARKS.md; raise it for recall, lower it for speed).
    """

    nlist: int | None = None
    nprobe: int | None = None

    def resolved(self, n: int) -> tuple[int, int]:
        nlist = self.nlist or max(1, min(int(round(np.sqrt(n))), n // 39))
        nprobe = self.nprobe or max(1, nlist // 8)
        if nlist < 1 or nlist > max(n, 1) or nprobe < 1:
            raise ValueError(f"IVFSettings: need 1 <= nlist <= n ({n}) and nprobe >= 1, got nlist {nlist}, "
                             f"nprobe {nprobe}")
        return nlist, min(nprobe, nlist)


def _faiss_module():
    """Returns the faiss module, or None when it is not installed."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _check_ids(ids, n: int, name: str = "ids") -> np.ndarray:
    """Returns `ids` as int64 [n]; raises ValueError on a wrong shape or dtype."""
    ids = np.asarray(ids)
    if ids.shape != (n,):
        raise ValueError(f"{name}: expected shape ({n},) (one id per code), got {ids.shape}")
    if n and ids.dtype.kind not in "iu":
        raise ValueError(f"{name}: ids must be integers, got dtype {ids.dtype}")
    if ids.dtype.kind == "u" and n and ids.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name}: ids must fit in int64")
    return np.ascontiguousarray(ids, dtype=np.int64)


def _check_paths(paths, n: int) -> np.ndarray:
    """Returns paths as a unicode array [n]."""
    paths = np.asarray([str(p) for p in paths], dtype=str)
    if paths.shape != (n,):
        raise ValueError(f"paths: expected {n} paths (one per code), got {paths.shape[0]}")
    return paths


def _check_duplicates(ids: np.ndarray) -> None:
    sorted_ids = np.sort(ids)
    repeated = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]]
    if repeated.size:
        raise ValueError(f"ids must be unique; id {repeated[0]} occurs more than once")


PROBE_KINDS = ("features", "jpeg")  # what an EncoderProbe's inputs are


@dataclasses.dataclass(frozen=True)
class EncoderProbe:
    """Which encoder made an index's codes, told by what it does: probe inputs and its codes of them.

    Every encoder of one trained model (Keras, SavedModel, float or quantised TFLite)
    reproduces the codes up to a few flipped bits; another model of the same code
    length agrees on about half of them. `kind` says what the inputs are: "features"
    (an index built from features) or "jpeg" (built from images: the encoded files).
    """

    inputs: np.ndarray | tuple[bytes, ...]  # features: float [P, D]; jpeg: P encoded JPEG/PNG files
    codes: np.ndarray  # 0/1 uint8 [P, M]: the encoder's codes of `inputs`
    kind: str = "features"

    def __post_init__(self):
        if self.kind not in PROBE_KINDS:
            raise ValueError(f"probe kind: expected one of {PROBE_KINDS}, got {self.kind!r}")
        codes = check_bits(self.codes, "probe_codes")
        if self.kind == "features":
            inputs = np.asarray(self.inputs)  # kept in its dtype (a float16 feature file: float16 rows)
            if inputs.ndim != 2 or inputs.dtype.kind != "f":
                raise ValueError(f"probe_inputs: expected float feature rows [P, D], got {inputs.dtype} "
                                 f"{inputs.shape}")
        else:
            inputs = tuple(bytes(file) for file in self.inputs)
        if len(inputs) != len(codes):
            raise ValueError(f"probe: {len(inputs)} inputs but {len(codes)} codes")
        object.__setattr__(self, "inputs", inputs)
        object.__setattr__(self, "codes", codes)

    def agreement(self, codes) -> float:
        """Fraction of bits equal between `codes` [P, M] (another encoder's codes of `inputs`) and ours."""
        codes = check_bits(codes, "codes")
        if codes.shape != self.codes.shape:
            raise ValueError(f"codes: expected shape {self.codes.shape} (the probe's), got {codes.shape}")
        return float(np.mean(codes == self.codes))

    def arrays(self) -> dict[str, np.ndarray]:
        """The index-file entries: probe_codes and, by kind, probe_inputs or probe_jpeg_bytes +
        probe_jpeg_offsets (concatenated files uint8 and int64 [P + 1] bounds, no pickle)."""
        if self.kind == "features":
            return {"probe_inputs": self.inputs, "probe_codes": self.codes}
        data, offsets = join_files(self.inputs)
        return {"probe_jpeg_bytes": data, "probe_jpeg_offsets": offsets, "probe_codes": self.codes}

    @classmethod
    def from_arrays(cls, contents) -> "EncoderProbe | None":
        """The probe held by index-file entries (`arrays`), None when they hold none; ValueError when damaged."""
        if "probe_inputs" in contents:
            return cls(contents["probe_inputs"], contents["probe_codes"])
        if "probe_jpeg_bytes" not in contents:
            return None
        try:
            files = split_files(contents["probe_jpeg_bytes"], contents["probe_jpeg_offsets"], "probe_jpeg_bytes",
                                "probe_jpeg_offsets", allow_empty=True)
        except ValueError as err:
            raise ValueError(f"probe_jpeg_bytes / probe_jpeg_offsets do not hold consecutive files ({err})") from None
        return cls(tuple(files), contents["probe_codes"], kind="jpeg")


class HammingIndex:
    """Exact Hamming-distance index over M-bit binary codes.

    Args:
      codes: 0/1 array [n, M] (uint8 or bool).
      ids: int [n], unique; defaults to arange(n).
      labels: optional per-code labels, [n] class ids or [n, C] multi-hot.
      paths: optional per-code strings [n] (e.g. image file names).
      backend: "numpy"; "faiss" (faiss.IndexBinaryFlat, candidates re-ranked
        so that results equal numpy's); "auto" = faiss for codes of 32 bits
        or more when faiss is installed, else numpy. All give identical results.
        "faiss_ivf": approximate (faiss.IndexBinaryIVF with `ivf` settings),
        built on the first search; only for `search`.
      workers: threads for numpy search; defaults to the number of CPUs.
    """

    def __init__(self, codes, ids=None, labels=None, paths=None, *, backend: str = "auto",
                 workers: int | None = None, ivf: IVFSettings | None = None):
        codes = check_bits(codes)
        if codes.shape[1] < 1:
            raise ValueError(f"codes: need at least one bit per code, got shape {codes.shape}")
        self._init_packed(np.packbits(codes, axis=1), codes.shape[1], ids, labels, paths,
                          backend, workers, ivf)

    @classmethod
    def from_packed(cls, packed, bits: int, ids=None, labels=None, paths=None, *,
                    backend: str = "auto", workers: int | None = None,
                    ivf: IVFSettings | None = None) -> "HammingIndex":
        """Builds an index from codes already packed by `tbhvae.codes.pack_codes`.

        packed: uint8 [n, ceil(bits / 8)]; padding bits past `bits` must be zero.
        """
        packed = np.asarray(packed)
        bits = int(bits)
        nbytes = num_bytes(bits)
        if bits < 1 or packed.ndim != 2 or packed.shape[1] != nbytes or packed.dtype != np.uint8:
            raise ValueError(f"packed: expected uint8 [n, {nbytes}] for {bits}-bit codes, "
                             f"got {packed.dtype} {packed.shape}")
        if bits % 8 and packed.size and np.any(packed[:, -1] & np.uint8(0xFF >> (bits % 8))):
            raise ValueError(f"packed: padding bits past bit {bits} must be zero "
                             "(pack with tbhvae.codes.pack_codes)")
        index = cls.__new__(cls)
        index._init_packed(packed, bits, ids, labels, paths, backend, workers, ivf)
        return index

    def _init_packed(self, packed, bits, ids, labels, paths, backend, workers, ivf):
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        if backend.startswith("faiss") and _faiss_module() is None:
            raise ValueError(f"backend={backend!r} needs faiss: pip install faiss-cpu "
                             "(or the tbhvae[faiss] extra), or use backend='numpy'")
        if ivf is not None and backend != "faiss_ivf":
            raise ValueError(f"ivf settings are for backend='faiss_ivf', not {backend!r}")
        if workers is not None and int(workers) < 1:
            raise ValueError(f"workers: expected a positive thread count, got {workers}")
        n = packed.shape[0]
        self._bits = bits
        self._backend = backend
        self._ivf = ivf or IVFSettings()
        if backend == "faiss_ivf":
            self._ivf.resolved(packed.shape[0])  # checks the settings now, not at the first search
        self._workers = int(workers) if workers is not None else (os.cpu_count() or 1)
        self._words = database_words(packed)  # uint64 [n, W], column-major
        self._ids = _check_ids(np.arange(n) if ids is None else ids, n)
        _check_duplicates(self._ids)
        self._labels = None if labels is None else check_labels(labels, n, "labels")
        self._paths = None if paths is None else _check_paths(paths, n)
        self._faiss_index = None
        self.encoder_probe: EncoderProbe | None = None  # set by whoever knows the encoder; saved with the index

    # ----------------------------------------------------------------- contents

    def __len__(self) -> int:
        return self._words.shape[0]

    def __repr__(self) -> str:
        return f"HammingIndex(n={len(self)}, bits={self._bits}, backend={self._backend!r})"

    @property
    def bits(self) -> int:
        """Bits per code (M)."""
        return self._bits

    @property
    def backend(self) -> str:
        """Search backend actually used by `search`: "numpy", "faiss" or "faiss_ivf"."""
        if self._backend == "auto":
            use_faiss = self._bits >= _AUTO_FAISS_MIN_BITS and _faiss_module() is not None
            return "faiss" if use_faiss else "numpy"
        return self._backend

    @property
    def ivf(self) -> IVFSettings:
        """Settings of the faiss_ivf backend; set a new nprobe without rebuilding (a new nlist rebuilds)."""
        return self._ivf

    @ivf.setter
    def ivf(self, settings: IVFSettings) -> None:
        if self._backend != "faiss_ivf":
            raise ValueError(f"ivf settings are for backend='faiss_ivf', not {self._backend!r}")
        nlist, nprobe = settings.resolved(len(self))
        if self._faiss_index is not None and self._faiss_index.nlist != nlist:
            self._faiss_index = None
        elif self._faiss_index is not None:
            self._faiss_index.nprobe = nprobe
        self._ivf = settings

    @property
    def ids(self) -> np.ndarray:
        """int64 [n] ids in index order (read-only)."""
        view = self._ids.view()
        view.flags.writeable = False
        return view

    @property
    def labels(self) -> np.ndarray | None:
        """Per-code labels in index order, or None."""
        return self._labels

    @property
    def paths(self) -> np.ndarray | None:
        """Per-code path strings [n] in index order, or None."""
        return self._paths

    @property
    def packed(self) -> np.ndarray:
        """Codes packed as by `tbhvae.codes.pack_codes`: uint8 [n, ceil(bits / 8)] (a copy)."""
        return np.ascontiguousarray(self._words).view(np.uint8)[:, :num_bytes(self._bits)].copy()

    @property
    def codes(self) -> np.ndarray:
        """Codes as 0/1 uint8 [n, bits] (a copy)."""
        return unpack_codes(self.packed, self._bits)

    @property
    def nbytes(self) -> int:
        """Memory held by codes, ids, labels and paths, in bytes (faiss copy excluded)."""
        extra = sum(a.nbytes for a in (self._labels, self._paths) if a is not None)
        return self._words.nbytes + self._ids.nbytes + extra

    def add(self, codes, ids=None, labels=None, paths=None) -> None:
        """Appends codes [m, bits] after the existing ones.

        ids default to max(existing ids) + 1 onwards (arange for a fresh index).
        labels / paths must be given exactly when the index already holds them.
        """
        codes = check_bits(codes)
        self._check_length(codes, "codes")
        m = codes.shape[0]
        if ids is None:
            start = int(self._ids.max()) + 1 if len(self) else 0
            ids = np.arange(start, start + m)
        new_ids = _check_ids(ids, m)
        all_ids = np.concatenate([self._ids, new_ids])
        _check_duplicates(all_ids)
        for name, given, held in (("labels", labels, self._labels), ("paths", paths, self._paths)):
            if (given is None) != (held is None):
                state = "holds" if held is not None else "was built without"
                raise ValueError(f"add: the index {state} {name}; pass {name} "
                                 f"{'for the new codes' if held is not None else '=None'}")
        if labels is not None:
            new_labels = check_labels(labels, m, "labels")
            if new_labels.shape[1:] != self._labels.shape[1:]:
                raise ValueError(f"labels: expected trailing shape {self._labels.shape[1:]}, "
                                 f"got {new_labels.shape[1:]}")
            self._labels = np.concatenate([self._labels, new_labels])
        if paths is not None:
            self._paths = np.concatenate([self._paths, _check_paths(paths, m)])
        new_words = to_words(np.packbits(codes, axis=1))
        self._words = np.concatenate([self._words.T, new_words.T], axis=1).T  # stays column-major
        self._ids = all_ids
        if self._faiss_index is not None:
            self._faiss_index.add(np.packbits(codes, axis=1))

    # ------------------------------------------------------------------ search

    def search(self, query_codes, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest codes of each query.

        query_codes: 0/1 [q, bits]. k > len(index) is clamped to len(index).
        Returns (distances int32 [q, k], ids int64 [q, k]), by ascending
        distance, ties by position in the index (faiss_ivf: the k nearest that
        its probed clusters hold, see `search.faiss_approximate_top_k`; a query
        whose clusters hold fewer than k codes is answered exactly).
        """
        query_words = self._query_words(query_codes)
        k = min(check_count(k, "k"), len(self))
        q = query_words.shape[0]
        if k == 0 or q == 0:
            return np.zeros((q, k), dtype=np.int32), np.zeros((q, k), dtype=np.int64)
        if self.backend == "faiss_ivf":
            distances, positions = search.faiss_approximate_top_k(self._faiss(), query_words, k)
            short = np.flatnonzero((positions < 0).any(axis=1))  # probed clusters held fewer than k codes
            if short.size:
                distances[short], positions[short] = search.numpy_top_k(
                    self._words, self._bits, query_words[short], k, self._workers)
        elif self.backend == "faiss":
            distances, positions = search.faiss_top_k(self._faiss(), len(self), query_words, k)
        else:
            distances, positions = search.numpy_top_k(self._words, self._bits, query_words, k, self._workers)
        return distances, self._ids[positions]

    def radius_search(self, query_codes, radius: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """All codes within Hamming distance <= radius of each query (numpy backend).

        Returns one (distances int32 [m_i], ids int64 [m_i]) pair per query,
        by ascending distance, ties by position in the index.
        """
        query_words = self._query_words(query_codes)
        radius = check_count(radius, "radius", allow_zero=True)
        within = search.numpy_within(self._words, self._bits, query_words, radius, self._workers)
        return [(distances, self._ids[positions]) for distances, positions in within]

    def _check_length(self, codes: np.ndarray, name: str) -> None:
        if codes.shape[1] != self._bits:
            raise ValueError(f"{name}: codes have {codes.shape[1]} bits but the index holds "
                             f"{self._bits}-bit codes")

    def _query_words(self, query_codes) -> np.ndarray:
        codes = check_bits(query_codes, "query_codes")
        self._check_length(codes, "query_codes")
        return to_words(np.packbits(codes, axis=1))

    def _faiss(self):
        if self._faiss_index is None:
            faiss = _faiss_module()
            dimension = 8 * num_bytes(self._bits)
            if self.backend == "faiss_ivf":
                nlist, nprobe = self._ivf.resolved(len(self))
                quantizer = faiss.IndexBinaryFlat(dimension)
                index = faiss.IndexBinaryIVF(quantizer, dimension, nlist)
                index.referenced_objects = [quantizer]  # the quantizer must outlive the index
                packed = self.packed
                sample = np.random.default_rng(0).permutation(len(packed))[:64 * nlist]  # faiss: 39-256 per list
                index.train(packed[np.sort(sample)])
                index.nprobe = nprobe
            else:
                index = faiss.IndexBinaryFlat(dimension)
                packed = self.packed
            index.add(packed)
            self._faiss_index = index
        return self._faiss_index

    # ------------------------------------------------------------------- files

    def save(self, path) -> None:
        """Writes the index to one .npz file (packed codes, ids, bits, labels, paths, encoder probe)."""
        path = Path(path)
        arrays = {
            "format": np.array(FORMAT_NAME),
            "version": np.array(FORMAT_VERSION),
            "bits": np.array(self._bits),
            "packed": self.packed,
            "ids": self._ids,
        }
        if self._labels is not None:
            arrays["labels"] = self._labels
        if self._paths is not None:
            arrays["paths"] = self._paths
        if self.encoder_probe is not None:
            arrays.update(self.encoder_probe.arrays())
        with atomic_path(path, ".partial") as partial, open(partial, "wb") as file:
            np.savez(file, **arrays)  # a file object: np.savez appends no ".npz"

    @classmethod
    def load(cls, path, *, backend: str = "auto", workers: int | None = None,
             ivf: IVFSettings | None = None) -> "HammingIndex":
        """Reads an index written by `save`.

        Raises FileNotFoundError when `path` is missing and ValueError when it is
        not a readable tbhvae Hamming index file.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such index file "
                                    "(write one with HammingIndex.save)")
        try:
            with open_npz(path) as archive:
                contents = {name: archive[name] for name in archive.files}
        except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as error:
            raise ValueError(f"{path}: unreadable or corrupt index file ({error})") from error
        if "format" not in contents:
            raise ValueError(f"{path}: not a tbhvae Hamming index (no 'format' entry)")
        if str(contents["format"]) != FORMAT_NAME:
            raise ValueError(f"{path}: not a tbhvae Hamming index (format {contents['format']!s})")
        missing = {"version", "bits", "packed", "ids"} - contents.keys()
        if missing:
            raise ValueError(f"{path}: corrupt index file, missing {sorted(missing)}")
        try:
            version, bits = int(contents["version"]), int(contents["bits"])
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: corrupt index file (bad version or bits entry)") from error
        if version > FORMAT_VERSION:
            raise ValueError(f"{path}: index format version {version} is newer than this "
                             f"tbhvae supports ({FORMAT_VERSION}); upgrade tbhvae")
        try:
            index = cls.from_packed(contents["packed"], bits, contents["ids"],
                                    contents.get("labels"), contents.get("paths"),
                                    backend=backend, workers=workers, ivf=ivf)
            index.encoder_probe = EncoderProbe.from_arrays(contents)
        except (ValueError, KeyError) as error:
            raise ValueError(f"{path}: corrupt index file ({error})") from error
        return index
