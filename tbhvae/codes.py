"""Binary codes: validation, packing and Hamming distances.

Bit order (shared by evaluation, the index and exported encoders): bit ``k`` of
a code is bit ``7 - k % 8`` (most significant first) of byte ``k // 8``, the
layout of ``np.packbits(bits, axis=1)``.
"""
from __future__ import annotations

import numpy as np

WORD_BYTES = 8


def check_bits(codes, name: str = "codes") -> np.ndarray:
    """Returns `codes` as a C-contiguous uint8 [n, M] array of 0/1 values.

    Raises ValueError naming `name` when the array is not 2-D or holds values
    other than 0 and 1.
    """
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"{name}: expected 0/1 codes of shape [n, bits], got shape {codes.shape}")
    if codes.dtype == np.bool_:
        return np.ascontiguousarray(codes, dtype=np.uint8)
    if codes.size and not (np.issubdtype(codes.dtype, np.integer) or np.isin(codes, (0, 1)).all()):
        raise ValueError(f"{name}: codes must hold only 0 and 1 (use 1[logit > 0] for signs)")
    if codes.size and (codes.min() < 0 or codes.max() > 1):
        raise ValueError(f"{name}: codes must hold only 0 and 1 (use 1[logit > 0] for signs)")
    return np.ascontiguousarray(codes, dtype=np.uint8)


def num_bytes(bits: int) -> int:
    """Bytes of one packed code of `bits` bits: ceil(bits / 8)."""
    return -(-bits // 8)


def pack_codes(codes) -> np.ndarray:
    """Packs 0/1 codes [n, M] into uint8 [n, ceil(M / 8)] (see module docstring)."""
    return np.packbits(check_bits(codes), axis=1)


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of `pack_codes`: uint8 [n, ceil(M / 8)] -> 0/1 uint8 [n, M]."""
    return np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=1, count=bits)


# Database codes per XOR/popcount block: 32768 uint64 words (256 KiB) stay in
# the L2 cache while every query row is compared against them.
_DB_BLOCK = 32768


def to_words(packed: np.ndarray) -> np.ndarray:
    """Views packed codes as uint64 words [n, ceil(bytes / 8)], zero-padded.

    Padding bits are zero in every code, so they never add to a distance.
    """
    packed = np.asarray(packed, dtype=np.uint8)
    n, nbytes = packed.shape
    nwords = max(1, -(-nbytes // WORD_BYTES))
    padded = np.zeros((n, nwords * WORD_BYTES), dtype=np.uint8)
    padded[:, :nbytes] = packed
    return padded.view(np.uint64)


def database_words(packed: np.ndarray) -> np.ndarray:
    """`to_words` [n, W] in column-major memory: the database layout `hamming_distances` reads without a copy."""
    return np.asfortranarray(to_words(packed))


def hamming_distances(query_words: np.ndarray, db_words: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Hamming distances between word-packed codes: [q, W] x [n, W] -> [q, n].

    The result is uint8 up to 192 bits (3 words) and uint16 beyond, so that
    numpy's stable sort of it is a radix sort; `out` (any unsigned [q, n]
    array wide enough for W * 64) is filled instead when given. The database
    is walked in cache-sized blocks of columns, each compared with one query
    row at a time, so the XOR scratch never leaves the L2 cache. Memory is
    O(q * n); callers chunk the queries. `db_words` in column-major memory
    (`database_words`) is read in place; any other layout is copied once per call.
    """
    q, n = query_words.shape[0], db_words.shape[0]
    if out is None:
        out = np.empty((q, n), dtype=np.uint8 if query_words.shape[1] <= 3 else np.uint16)
    db_columns = np.ascontiguousarray(db_words.T)  # [W, n]; a view of a column-major db_words
    block = max(1, min(n, _DB_BLOCK))
    xor = np.empty(block, dtype=np.uint64)
    count = np.empty(block, dtype=np.uint8)
    for start in range(0, n, block):
        stop = min(n, start + block)
        width = stop - start
        for w, column in enumerate(db_columns):
            for i in range(q):
                np.bitwise_xor(column[start:stop], query_words[i, w], out=xor[:width])
                if w == 0:
                    np.bitwise_count(xor[:width], out=out[i, start:stop], casting="unsafe")
                else:
                    out[i, start:stop] += np.bitwise_count(xor[:width], out=count[:width])
    return out
