"""Hamming k-nearest-neighbour search in a Milvus collection: for when one process's index is not enough.

    index = MilvusHammingIndex("codes.db", bits=32)              # Milvus Lite, embedded (a local file)
    index = MilvusHammingIndex("http://milvus:19530", bits=32)   # a Milvus server, the same code
    index.add(codes, ids); distances, ids = index.search(query_codes, k=10); index.delete(ids)

On a server the codes are BINARY_VECTOR fields with the HAMMING metric and a
BIN_IVF_FLAT index. Milvus Lite has no binary vectors (3.2: "BinaryVector which
MilvusLite does not support"), so there each code is a FLOAT_VECTOR of its 0/1
bits with the L2 metric and an IVF_FLAT index: for 0/1 vectors the squared L2
distance is the Hamming distance, so the answers are the same. The storage is
chosen when the collection is created and read back from its schema when it is
opened again. Results are ordered as `HammingIndex` orders them, by (distance,
id); which of the codes tied at the k-th distance Milvus keeps is its choice.

Every read (search, len) is made at Strong consistency, so it sees every add
and delete that has returned, from any client. A server's default, Bounded,
reads up to `common.gracefulTime` (5 s) in the past: a search right after an add
found nothing on Milvus 2.3.5. New collections are also created Strong, for
other clients of them. Milvus Lite, always up to date, accepts the same requests.
"""
import numpy as np

from tbhvae.checks import check_count
from tbhvae.codes import check_bits, num_bytes

ID_FIELD, CODE_FIELD = "id", "code"
STRONG = "Strong"  # consistency level: a read waits until the server has applied every earlier write


class MilvusError(RuntimeError):
    """Milvus refused or failed an operation (one line, with what to do)."""


def _pymilvus():
    try:
        import pymilvus
    except ImportError:
        raise MilvusError("the Milvus backend needs pymilvus (and milvus-lite for a local file): "
                          "pip install 'tbhvae[milvus]'") from None
    return pymilvus


class MilvusHammingIndex:
    """Codes 0/1 [n, bits] with int64 ids in one Milvus collection (created when missing).

    uri: a local file path (Milvus Lite) or a server URI; token: the server's
    credentials ("user:password" or an API key); nlist: clusters of the IVF
    index, fixed when the collection is created (1024 suits ~10^6 codes, as
    sqrt(n) in `tbhvae.index.IVFSettings`); nprobe: clusters searched per query
    (default nlist / 8, as there).
    """

    def __init__(self, uri: str, bits: int, collection: str = "tbhvae_codes", *, token: str = "",
                 nlist: int = 1024, nprobe: int | None = None):
        pymilvus = _pymilvus()
        self.bits, self.collection = int(bits), collection
        self.nprobe = int(nprobe or max(1, nlist // 8))
        try:
            self._client = pymilvus.MilvusClient(uri, token=token)
            if self._client.has_collection(collection):
                self.storage = self._open_existing()
            else:
                self.storage = self._create(pymilvus, nlist)
        except pymilvus.MilvusException as err:
            raise MilvusError(f"Milvus at {uri}: {err.message}") from None

    # ------------------------------------------------------------------ collection
    def _open_existing(self) -> str:
        fields = {f["name"]: f for f in self._client.describe_collection(self.collection)["fields"]}
        code = fields.get(CODE_FIELD)
        if code is None or ID_FIELD not in fields:
            raise MilvusError(f"collection {self.collection!r} is not a tbhvae code collection (fields "
                              f"{sorted(fields)}); choose another collection name")
        binary = code["type"].name == "BINARY_VECTOR"
        dim = int(code["params"]["dim"])
        if dim != (8 * num_bytes(self.bits) if binary else self.bits):
            raise MilvusError(f"collection {self.collection!r} holds codes of another length ({dim} "
                              f"{'binary ' if binary else ''}dimensions), not {self.bits} bits")
        self._client.load_collection(self.collection)
        return "binary" if binary else "float"

    def _create(self, pymilvus, nlist: int) -> str:
        for storage in ("binary", "float"):
            schema = pymilvus.MilvusClient.create_schema(auto_id=False)
            schema.add_field(ID_FIELD, pymilvus.DataType.INT64, is_primary=True)
            if storage == "binary":
                schema.add_field(CODE_FIELD, pymilvus.DataType.BINARY_VECTOR, dim=8 * num_bytes(self.bits))
            else:
                schema.add_field(CODE_FIELD, pymilvus.DataType.FLOAT_VECTOR, dim=self.bits)
            params = self._client.prepare_index_params()
            params.add_index(field_name=CODE_FIELD, index_type="BIN_IVF_FLAT" if storage == "binary" else "IVF_FLAT",
                             metric_type="HAMMING" if storage == "binary" else "L2", params={"nlist": int(nlist)})
            try:
                self._client.create_collection(self.collection, schema=schema, index_params=params,
                                               consistency_level=STRONG)
                return storage
            except pymilvus.MilvusException as err:
                if storage == "float" or "not support" not in err.message.lower():
                    raise
        raise AssertionError("unreachable")

    def _vectors(self, codes: np.ndarray) -> list:
        if self.storage == "binary":
            return [row.tobytes() for row in np.packbits(codes, axis=1)]
        return codes.astype(np.float32).tolist()

    def _check(self, codes, name: str) -> np.ndarray:
        codes = check_bits(codes, name)
        if codes.shape[1] != self.bits:
            raise ValueError(f"{name}: codes have {codes.shape[1]} bits but the collection holds {self.bits}-bit codes")
        return codes

    # ------------------------------------------------------------------ contents
    def __len__(self) -> int:
        counted = self._client.query(self.collection, filter="", output_fields=["count(*)"], consistency_level=STRONG)
        return int(counted[0]["count(*)"])

    def add(self, codes, ids) -> None:
        """Inserts codes 0/1 [m, bits] with their unique int64 ids [m] (an existing id is replaced)."""
        codes = self._check(codes, "codes")
        ids = np.asarray(ids, np.int64).reshape(-1)
        if len(ids) != len(codes) or len(np.unique(ids)) != len(ids):
            raise ValueError(f"ids: need {len(codes)} distinct ids, one per code")
        vectors = self._vectors(codes)
        for start in range(0, len(ids), 10_000):  # bounded requests
            rows = [{ID_FIELD: int(i), CODE_FIELD: v} for i, v in
                    zip(ids[start:start + 10_000], vectors[start:start + 10_000])]
            self._client.upsert(self.collection, rows)

    def delete(self, ids) -> None:
        """Removes the codes of `ids` (ids not held are ignored)."""
        self._client.delete(self.collection, ids=[int(i) for i in np.asarray(ids, np.int64).reshape(-1)])

    # ------------------------------------------------------------------ search
    def search(self, query_codes, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances int32 [q, k'], ids int64 [q, k']) by (distance, id); k' = min(k, len(self)).

        A query for which Milvus finds fewer than k' codes (its probed clusters
        hold fewer) has id -1 and distance int32 max in the missing places.
        """
        codes = self._check(query_codes, "query_codes")
        k = check_count(k, "k")
        if len(codes) == 0:
            return np.zeros((0, 0), np.int32), np.zeros((0, 0), np.int64)
        metric = "HAMMING" if self.storage == "binary" else "L2"
        answers = self._client.search(self.collection, data=self._vectors(codes), limit=k, anns_field=CODE_FIELD,
                                      output_fields=[ID_FIELD], consistency_level=STRONG,
                                      search_params={"metric_type": metric, "params": {"nprobe": self.nprobe}})
        width = max(len(hits) for hits in answers)
        distances = np.full((len(answers), width), np.iinfo(np.int32).max, np.int64)
        found = np.full((len(answers), width), -1, np.int64)  # where Milvus found fewer than the others
        for row, hits in enumerate(answers):
            distances[row, :len(hits)] = [round(hit["distance"]) for hit in hits]
            found[row, :len(hits)] = [hit["id"] for hit in hits]
        order = np.lexsort((found, distances), axis=1)
        return (np.take_along_axis(distances, order, axis=1).astype(np.int32),
                np.take_along_axis(found, order, axis=1))

    def close(self) -> None:
        self._client.close()
