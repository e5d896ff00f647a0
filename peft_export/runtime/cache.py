"""An on-disk cache of image embeddings (``peft-export embed``; ``Segmenter(cache=...)``; ``predict --embeddings``).

A cache folder belongs to one export: ``cache.json`` records the sha256 of the export's encoder graph (what
determines an embedding: the same encoder gives the same embeddings whatever the decoder), its model,
precision, embedding shape and preprocessing; a folder made with another export is refused. Each entry is one
image (or one plane of a stack) under one tiling recipe::

    <key>.npy    float32 (tiles, C, h, w): every tile's embedding, memory-mapped when read
    <key>.json   the image's name, shape and digest, the recipe (tiled, tile, halo, scale), the tile windows,
                 the sha256 of the .npy (checked on every read: an entry that changed is recomputed, never used)

``key`` = sha256 of (the image's pixels, shape and dtype; the recipe; the encoder's sha256). Entries are written
atomically (``.npy`` first, ``.json`` last: an entry without its ``.json`` is incomplete and recomputed), so
several processes (shards of a job array) can fill one cache.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from peft_export.data.io import atomic_write
from peft_export.data.samples import sha256_file
from peft_export.errors import DataError, UsageError, first_line
from peft_export.files import clean_stale, parse_temp
from peft_export.manifest import read_json_document

log = logging.getLogger(__name__)

CACHE_META = "cache.json"
CACHE_FORMAT = "peft-export-embeddings"
CACHE_FORMAT_VERSION = 1


def export_identity(info) -> dict:
    """What an embedding depends on, from a runtime backend's :class:`~peft_export.runtime.backend.BackendInfo`."""
    if info.encoder_sha256 is None:
        raise UsageError("an embedding cache needs an export folder (ONNX Runtime, OpenVINO or TensorRT backend), "
                         "not a PyTorch model")
    return {"encoder_sha256": info.encoder_sha256, "model": info.model, "precision": info.precision,
            "embedding": list(info.embedding_shape), "preprocess": info.preprocess.to_dict(),
            "baked_preprocessing": bool(info.baked_preprocessing)}


class EmbeddingCache:
    """``get(key)`` / ``put(key, embeddings, meta)`` over a cache folder of one export."""

    def __init__(self, folder: str | os.PathLike, identity: dict, *, create: bool = True):
        self.folder = Path(folder)
        self.identity = identity
        meta_path = self.folder / CACHE_META
        if self.folder.is_dir():
            clean_stale(self.folder)  # entries a killed run was writing
        if meta_path.is_file():
            data = read_json_document(meta_path, CACHE_FORMAT, CACHE_FORMAT_VERSION, "embedding cache")
            theirs = data.get("export", {})
            if theirs.get("encoder_sha256") != identity["encoder_sha256"]:
                raise DataError(f"{self.folder} holds embeddings of another export ({theirs.get('model')}, encoder "
                                f"sha256 {str(theirs.get('encoder_sha256'))[:12]}…; this export's is "
                                f"{identity['encoder_sha256'][:12]}…): use another cache folder for this export")
        elif self.folder.is_file():
            raise DataError(f"embedding cache {self.folder} is a file, not a folder")
        elif self.folder.is_dir() and any(parse_temp(p) is None for p in self.folder.iterdir()):
            raise DataError(f"{self.folder} is not an embedding cache (it has no {CACHE_META}); give an empty or new "
                            "folder")
        elif not create:
            raise DataError(f"embedding cache not found: {self.folder} (make one with `peft-export embed`)")
        if not meta_path.is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            doc = {"format": CACHE_FORMAT, "format_version": CACHE_FORMAT_VERSION, "export": identity,
                   "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            atomic_write(meta_path, lambda tmp: tmp.write_text(json.dumps(doc, indent=2) + "\n"))

    @property
    def encoder_sha256(self) -> str:
        return self.identity["encoder_sha256"]

    def paths(self, key: str) -> tuple[Path, Path]:
        return self.folder / f"{key}.npy", self.folder / f"{key}.json"

    def has(self, key: str) -> bool:
        npy, meta = self.paths(key)
        return npy.is_file() and meta.is_file()

    def get(self, key: str) -> np.ndarray | None:
        """The entry's embeddings (memory-mapped, read-only) after checking them against the sha256 its ``.json``
        records; None (recompute) when the entry is missing, incomplete, unreadable or does not match (with a
        warning: a changed entry is never used)."""
        npy, meta = self.paths(key)
        if not (npy.is_file() and meta.is_file()):
            return None
        try:
            doc = json.loads(meta.read_text())
            want = doc.get("npy_sha256") if isinstance(doc, dict) else None
            if want is None:
                log.warning("embedding cache entry %s records no sha256 (an older cache): recomputing it", npy.name)
                return None
            if sha256_file(npy) != want:
                log.warning("embedding cache entry %s does not match its sha256 (modified or corrupt): recomputing "
                            "it", npy.name)
                return None
            return np.load(npy, mmap_mode="r")
        except (OSError, ValueError) as exc:
            log.warning("embedding cache entry %s is unreadable (%s): recomputing it", npy.name, first_line(exc))
            return None

    def put(self, key: str, embeddings: np.ndarray, meta: dict) -> None:
        """Write an entry: the ``.npy`` first, then the ``.json`` that records its sha256 (an entry counts only
        once its ``.json`` is there)."""
        npy, meta_path = self.paths(key)
        arr = np.ascontiguousarray(embeddings, np.float32)
        digest = {}

        def _save(tmp: Path):
            with open(tmp, "wb") as fh:
                np.save(fh, arr)
            digest["sha256"] = sha256_file(tmp)

        atomic_write(npy, _save)
        doc = {**meta, "shape": list(arr.shape), "npy_sha256": digest["sha256"],
               "encoder_sha256": self.encoder_sha256,
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        atomic_write(meta_path, lambda tmp: tmp.write_text(json.dumps(doc, indent=2) + "\n"))


def open_cache(cache, info) -> EmbeddingCache | None:
    """``cache``: None, a folder, or an :class:`EmbeddingCache` (checked against the backend's export, ``info``)."""
    if cache is None:
        return None
    identity = export_identity(info)
    if isinstance(cache, EmbeddingCache):
        if cache.encoder_sha256 != identity["encoder_sha256"]:
            raise DataError(f"{cache.folder} holds embeddings of another export; use another cache folder")
        return cache
    return EmbeddingCache(cache, identity)
